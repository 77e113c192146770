"""Metrics to Weights & Biases through MetricsLogger: a real offline wandb
run in a temporary directory, read back with wandb's own reader of the
run's transaction log (`wandb leet inspect --json`)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from stream_rl.config import ConfigError, config_from_dict
from stream_rl.metrics import MetricsLogger, read_metrics
from stream_rl.metrics_wandb import RUN_ID_FILE
from stream_rl.preflight import check_job

RECORDS = [{"step": s, "reward_policy_mean": 0.25 * s, "prune/keep_rate": 0.5, "groups": 4 + s,
            "converged": s == 2, "pruner_state": "warm", "group_ids": [s, s + 10], "head_auc": None}
           for s in (1, 2, 3)]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb never prompts nor reaches the network, and keeps its files in tmp."""
    pytest.importorskip("wandb")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb-home",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data", "WANDB_DISABLE_CODE": "true",
                       "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(var, str(value))


def wandb_config(**run):
    return config_from_dict({"run": {"wandb_project": "stream-rl-test", "wandb_mode": "offline", **run}})


def log_records(out, records, resumed=False, **run):
    logger = MetricsLogger(out, len(records), show_progress=False, cfg=wandb_config(**run), resumed=resumed)
    for r in records:
        logger.log(r)
    logger.close()


def offline_runs(out) -> list:
    return sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))


def inspect(run_file, *flags) -> str:
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(run_file)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done.stdout


def history(run_file) -> dict[int, dict]:
    """Each logged step's values, W&B's own keys (_runtime, ...) left out."""
    rows = [json.loads(line) for line in inspect(run_file).splitlines() if line.strip()]
    return {r["history"]["step"]["num"]: {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            for r in rows if r["type"] == "history"}


def test_each_step_reaches_wandb_at_its_step_with_numbers_only(tmp_path, offline_wandb):
    out = tmp_path / "run-7"
    out.mkdir()
    log_records(out, RECORDS)
    [run_file] = offline_runs(out)
    assert history(run_file) == {r["step"]: {"reward_policy_mean": r["reward_policy_mean"], "prune/keep_rate": 0.5,
                                             "groups": r["groups"], "converged": int(r["converged"])}
                                 for r in RECORDS}
    run = json.loads(inspect(run_file, "--summary"))
    assert run["run_id"] == (out / RUN_ID_FILE).read_text() and run["name"] == "run-7"
    assert run["config"]["run"]["wandb_project"] == "stream-rl-test" and run["state"] == "finished"
    assert read_metrics(out / "metrics.jsonl") == RECORDS  # the JSONL keeps everything


def test_resumed_job_continues_its_wandb_run_and_a_fresh_one_starts_another(tmp_path, offline_wandb):
    log_records(tmp_path, RECORDS[:2], wandb_name="first")
    first = (tmp_path / RUN_ID_FILE).read_text()
    log_records(tmp_path, RECORDS[2:], resumed=True)
    assert (tmp_path / RUN_ID_FILE).read_text() == first
    started, resumed = offline_runs(tmp_path)
    assert resumed.stem == started.stem == f"run-{first}"
    assert sorted(history(started)) == [1, 2] and sorted(history(resumed)) == [3]
    log_records(tmp_path, RECORDS[:1])  # a fresh job in the same OUT
    assert (tmp_path / RUN_ID_FILE).read_text() != first


def test_a_wandb_failure_while_logging_is_warned_once_and_the_jsonl_goes_on(tmp_path, offline_wandb, caplog):
    import wandb

    logger = MetricsLogger(tmp_path, 3, show_progress=False, cfg=wandb_config())
    logger.log(RECORDS[0])
    wandb.finish()  # the run ends under the logger: W&B refuses every later log
    with caplog.at_level(logging.WARNING, logger="stream_rl.metrics_wandb"):
        logger.log(RECORDS[1])
        logger.log(RECORDS[2])
    logger.close()
    [warning] = [r.message for r in caplog.records if r.name == "stream_rl.metrics_wandb"]
    assert warning.startswith("W&B logging failed at step 2")
    assert read_metrics(tmp_path / "metrics.jsonl") == RECORDS


def test_missing_wandb_is_named_by_its_key_before_the_job_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if not installed
    cfg = wandb_config()
    with pytest.raises(ConfigError, match=r"run\.wandb_project .*pip install 'stream-rl\[wandb\]'"):
        check_job(cfg)  # first: before the model and data load
    with pytest.raises(ConfigError, match=r"run\.wandb_project"):
        MetricsLogger(tmp_path, 1, show_progress=False, cfg=cfg)


def test_no_project_no_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    log_records(tmp_path, RECORDS, wandb_project=None)
    assert not (tmp_path / "wandb").exists() and not (tmp_path / RUN_ID_FILE).exists()
    assert read_metrics(tmp_path / "metrics.jsonl") == RECORDS
