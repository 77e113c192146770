"""A user's own model and data, first try, against the real engine: a LLaMA
with untied embeddings, a chat template and a list eos_token_id, trained on
a JSONL math set with its own field names, then evaluated on the Parquet
split; and the errors a user meets before anything starts."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port, logprob_gaps_within
from stream_rl.config import ConfigError, config_from_dict
from tests.user_world import build_llama, write_math_data

pytestmark = pytest.mark.engine


def user_config(model: Path, data: Path, out: Path, **data_keys) -> dict:
    """tiny.yaml's settings with the user's model and data, and no eval
    section: eval inherits the data's answer key."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw.pop("eval")
    raw["model"]["path"] = str(model)
    raw["data"] = {"path": str(data), "prompt_field": "question", "answer_field": "final_answer",
                   "apply_chat_template": True, "system_prompt": "Put the final answer in \\boxed{}.",
                   "max_prompt_tokens": 192, **data_keys}
    raw["generator"].update(target_groups=2, group_size=4, max_tokens=24, enforce_eager=True,
                            request_addr=f"tcp://127.0.0.1:{free_port()}", stream_addr=f"tcp://127.0.0.1:{free_port()}")
    # A random model earns no reward: with a KL term every sample is run (and
    # its engine/learner log-prob gap measured), not only those with an advantage.
    raw["learner"].update(addr=f"tcp://127.0.0.1:{free_port()}", reply_addr=f"tcp://127.0.0.1:{free_port()}",
                          kl_beta=0.001, mask_truncated=False)
    raw["run"].update(out_dir=str(out), progress=False, snapshot_every=0)
    raw["pruner"]["l_detect"] = 16  # tiny.yaml's ARRoL, scoring below these short responses' budget
    return raw


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    return {"model": build_llama(root / "model"), "data": write_math_data(root / "data"), "root": root}


@pytest.fixture(scope="module")
def trained(world):
    from stream_rl.controller.launch import train

    out = world["root"] / "run"
    cfg = config_from_dict(user_config(world["model"], world["data"]["train"], out))
    sockets = set(Path(tempfile.gettempdir()).glob("stream-rl-reports-*"))
    summary = train(cfg, out, max_steps=3)
    return {"cfg": cfg, "out": out, "summary": summary, "sockets_before": sockets}


def test_train_with_a_chat_template_on_a_llama(trained):
    records = [json.loads(line) for line in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["samples_trained"] > 0 for r in records)
    # The engine samples what the learner scores (untied output layer, list eos): their log-probs agree.
    assert logprob_gaps_within(records)
    log = (trained["out"] / "generator.log").read_text()
    assert "Failed to load weights" not in log  # the rotary tables' harmless reload warning is dropped
    # The engine's report socket left no file behind (an abstract socket on Linux).
    assert set(Path(tempfile.gettempdir()).glob("stream-rl-reports-*")) <= trained["sockets_before"]


def test_eval_inherits_the_data_answer_key_and_reads_parquet(trained, world):
    from stream_rl.eval.run import evaluate

    cfg = trained["cfg"]
    assert (cfg.eval.answer_field, cfg.eval.answer_regex) == ("final_answer", None)
    raw = msgspec_raw(cfg)
    raw["data"]["path"] = str(world["data"]["train"].with_suffix(".parquet"))  # --data defaults to eval.parquet
    cfg = config_from_dict(raw)
    summary = evaluate(cfg, trained["out"] / "final_model", k=2, limit=4, progress=False)
    assert summary["data"].endswith("eval.parquet") and summary["questions"] == 4
    assert summary["answer_key"] == {"field": "final_answer", "regex": None, "match": "math"}


def test_eval_of_a_checkpoint_with_another_models_config_fails_before_the_engine(trained):
    from stream_rl.config import load_config
    from stream_rl.eval.checkpoint import CheckpointError
    from stream_rl.eval.run import evaluate

    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    with pytest.raises(CheckpointError, match="model_type 'llama' there, 'qwen3' here.*model.path"):
        evaluate(tiny, trained["out"] / "checkpoint", k=1, limit=1, progress=False)


def msgspec_raw(cfg) -> dict:
    from stream_rl.config import config_to_dict

    return config_to_dict(cfg)


# --- what the CLI says before anything starts -------------------------------------------------------

def _cli(args: list[str]) -> tuple[int, str, str]:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "stream_rl", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_check_config_reads_the_model_tokenizer_and_data(world, tmp_path):
    raw = user_config(world["model"], world["data"]["train"], tmp_path / "run")
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc, out, err = _cli(["check-config", "--config", str(path)])
    assert rc == 0, err
    checked = json.loads(out[out.rindex('{\n  "checked"'):])["checked"]
    assert checked["model_type"] == "llama" and checked["prompts"] == 8
    assert checked["first_prompt_rendered"].startswith("<|im_start|>system\nPut the final answer")
    # A bad row: named by file:line and the key to set, before any process starts.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(world["data"]["train"].read_text() + json.dumps({"question": "What is 1 + 1?"}) + "\n")
    raw["data"]["path"] = str(bad)
    path.write_text(yaml.safe_dump(raw))
    for cmd in (["check-config", "--config", str(path)], ["train", "--config", str(path), "--out", str(tmp_path / "o")]):
        rc, out, err = _cli(cmd)
        assert rc == 2 and f"{bad}:9: missing field 'final_answer' (set by data.answer_field" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "o" / "generator.log").exists()  # nothing was started


def test_check_config_refuses_a_shape_the_cpu_engine_cannot_serve(world, tmp_path):
    """check-config says it before anything starts; a job says it once,
    from the generator's own check, instead of "exited with code 1"."""
    from transformers import AutoConfig

    from stream_rl.generator.client import GeneratorError
    from stream_rl.controller.launch import train

    small = tmp_path / "model16"
    small.mkdir()
    for f in Path(world["model"]).iterdir():
        if f.name != "config.json":
            (small / f.name).symlink_to(f)
    mc = AutoConfig.from_pretrained(world["model"])
    mc.head_dim, mc.hidden_size, mc.num_attention_heads, mc.num_key_value_heads = 16, 32, 2, 1
    mc.save_pretrained(small)
    raw = user_config(small, world["data"]["train"], tmp_path / "run")
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc, _, err = _cli(["check-config", "--config", str(path)])
    assert rc == 2 and "head_dim 16" in err and "CPU attention" in err, err
    with pytest.raises(GeneratorError, match="generator 0 process exited with code 1: .*GeneratorDied: model.path's "
                                             "model has head_dim 16"):
        train(config_from_dict(raw), tmp_path / "run", max_steps=1)


def test_a_tokenizer_without_a_chat_template_is_named(world, tmp_path):
    from stream_rl.data import DataError
    from stream_rl.preflight import check_job

    plain = tmp_path / "plain"
    plain.mkdir()
    for f in Path(world["model"]).iterdir():
        if f.name != "tokenizer_config.json" and f.name != "chat_template.jinja":
            (plain / f.name).symlink_to(f)
    conf = json.loads((Path(world["model"]) / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(conf))
    cfg = config_from_dict(user_config(plain, world["data"]["train"], tmp_path / "run"))
    with pytest.raises(DataError, match="data.apply_chat_template is true, but the tokenizer of model.path"):
        check_job(cfg)


def test_model_path_that_is_no_model_is_named(world, tmp_path):
    from stream_rl.preflight import check_job

    cfg = config_from_dict(user_config(tmp_path / "nowhere", world["data"]["train"], tmp_path / "run"))
    with pytest.raises(ConfigError, match="model.path .*nowhere"):
        check_job(cfg)
