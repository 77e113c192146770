"""`run.export_rollouts`: every trained batch as one Parquet file per step,
read back with `datasets` as an offline method would, every value and
dtype as the learner was sent it; survivors only; whole files; a resume's
redone steps replaced."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import Features, List, Value, load_dataset

from stream_rl.controller import export as export_mod
from stream_rl.controller.export import SCHEMA, RolloutExport, file_name
from stream_rl.protocol import Group, Rollout


def rollout(gid: str, i: int, *, step: int, reason: str = "stop", logprobs: bool = True, n: int = 5,
            keep_prob: float = 1.0, prompt_inclusion: float = 1.0) -> Rollout:
    resp = [100 * step + 10 * i + k for k in range(n)]
    return Rollout(rollout_id=f"{gid}.{i}", group_id=gid, prompt_ids=[1, 2, step], answer="7", max_tokens=64,
                   response_ids=resp, logprobs=[-0.125 * (k + 1) - i for k in range(n)] if logprobs else None,
                   versions=[step - 1] * (n - 2) + [step] * 2, finish_reason=reason,
                   reward=float(i % 2) + 0.25 * step, keep_prob=keep_prob, prompt_inclusion=prompt_inclusion)


def batch(step: int) -> list[Group]:
    """Three groups of four: one with two pruned members (and survivors of
    keep_prob < 1 beside a DPPO prompt inclusion), one without log-probs,
    one truncated member; response lengths differ."""
    a = Group(group_id=f"s{step}-a", rollouts=[
        rollout(f"s{step}-a", 0, step=step, keep_prob=0.5, prompt_inclusion=0.8),
        rollout(f"s{step}-a", 1, step=step, reason="pruned", n=3),
        rollout(f"s{step}-a", 2, step=step, keep_prob=0.25, prompt_inclusion=0.8, n=7),
        rollout(f"s{step}-a", 3, step=step, reason="pruned", n=2),
    ])
    b = Group(group_id=f"s{step}-b", rollouts=[rollout(f"s{step}-b", i, step=step, logprobs=False, n=4 + i)
                                               for i in range(4)])
    c = Group(group_id=f"s{step}-c", rollouts=[rollout(f"s{step}-c", i, step=step, reason="length" if i == 3 else "stop")
                                               for i in range(4)])
    return [a, b, c]


def expected_rows(step: int) -> list[dict]:
    return [{"step": step, "group_id": g.group_id, "rollout_id": r.rollout_id, "group_size": len(g.rollouts),
             "prompt_ids": r.prompt_ids, "response_ids": r.response_ids, "logprobs": r.logprobs,
             "versions": r.versions, "reward": r.reward, "inclusion": r.keep_prob * r.prompt_inclusion,
             "finish_reason": r.finish_reason}
            for g in batch(step) for r in g.survivors]


def load(d, tmp_path):
    return load_dataset("parquet", data_dir=str(d), split="train", cache_dir=str(tmp_path / "hf"))


def test_batches_round_trip_through_datasets_survivors_only(tmp_path):
    d = tmp_path / "export"
    ex = RolloutExport(d)
    for step in (1, 2, 3):
        assert ex.write(step, batch(step)) == d / file_name(step)
    assert sorted(p.name for p in d.iterdir()) == ["step_000001.parquet", "step_000002.parquet",
                                                   "step_000003.parquet"]
    ds = load(d, tmp_path)
    ints, floats, text = Value("int32"), Value("float64"), Value("string")
    assert ds.features == Features({
        "step": Value("int64"), "group_id": text, "rollout_id": text, "group_size": ints, "prompt_ids": List(ints),
        "response_ids": List(ints), "logprobs": List(Value("float32")), "versions": List(ints), "reward": floats,
        "inclusion": floats, "finish_reason": text})
    rows = sorted(ds, key=lambda r: (r["step"], r["rollout_id"]))
    want = [row for step in (1, 2, 3) for row in expected_rows(step)]
    assert len(rows) == len(want) == 3 * 10  # 2 of each step's 12 rollouts were pruned
    for got, exp in zip(rows, sorted(want, key=lambda r: (r["step"], r["rollout_id"]))):
        assert got == exp  # the float32 log-probs here are exact in float32
    assert all(r["finish_reason"] != "pruned" for r in rows)
    assert {r["group_size"] for r in rows} == {4}  # the members before pruning: HT's N
    assert [r["inclusion"] for r in rows if r["rollout_id"] == "s1-a.2"] == [0.25 * 0.8]
    assert all(r["logprobs"] is None for r in rows if "-b." in r["rollout_id"])


def test_each_file_holds_its_step_only_with_the_schema(tmp_path):
    ex = RolloutExport(tmp_path)
    for step in (1, 2):
        ex.write(step, batch(step))
    for step in (1, 2):
        table = pq.read_table(tmp_path / file_name(step))
        assert table.schema.equals(SCHEMA)
        assert set(table.column("step").to_pylist()) == {step}
        assert table.to_pylist() == expected_rows(step)


def test_an_empty_batch_is_a_typed_empty_file(tmp_path):
    ex = RolloutExport(tmp_path)
    ex.write(1, [])
    table = pq.read_table(tmp_path / file_name(1))
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)


def test_a_file_appears_whole_under_its_name(tmp_path, monkeypatch):
    """Written under a hidden temporary name and renamed: a write that fails
    half way leaves no file of that step, and the next write (or the drop a
    resume makes) removes what it left."""
    ex = RolloutExport(tmp_path)
    ex.write(1, batch(1))
    seen = []

    def failing(table, where, **kw):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export_mod.pq, "write_table", failing)
    with pytest.raises(OSError, match="disk full"):
        ex.write(2, batch(2))
    assert seen == [[".step_000002.parquet.tmp", "step_000001.parquet"]]  # not yet under its name
    assert ex.steps() == [1]
    monkeypatch.undo()
    assert load(tmp_path, tmp_path.parent / f"{tmp_path.name}-hf")["step"] == [1] * 10  # readers skip the temporary
    ex.drop_after(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001.parquet"]
    ex.write(2, batch(2))
    assert ex.steps() == [1, 2] and pq.read_table(tmp_path / file_name(2)).num_rows == 10


def test_drop_after_removes_the_killed_runs_later_steps(tmp_path):
    d = tmp_path / "export"
    killed = RolloutExport(d)
    for step in (1, 2, 3, 4):
        killed.write(step, batch(step))
    (d / "step_2.txt").write_text("not ours")
    resumed = RolloutExport(d)  # a checkpoint at step 2
    resumed.drop_after(2)
    assert resumed.steps() == [1, 2] and (d / "step_2.txt").exists()
    (d / "step_2.txt").unlink()
    resumed.write(3, batch(3))
    assert resumed.steps() == [1, 2, 3]
    ds = load(d, tmp_path)
    assert sorted(ds["step"]) == sorted([1] * 10 + [2] * 10 + [3] * 10)  # each step once


def test_a_fresh_job_replaces_an_earlier_jobs_files_from_its_first_step(tmp_path):
    """A fresh job (no resume) in the same DIR: an earlier, longer job's
    files would otherwise mix with its own (metrics.jsonl starts over too)."""
    earlier = RolloutExport(tmp_path)
    for step in (1, 2, 3, 4, 5):
        earlier.write(step, batch(step))
    fresh = RolloutExport(tmp_path)
    fresh.write(1, batch(2))
    assert fresh.steps() == [1]
    fresh.write(2, batch(2))
    assert fresh.steps() == [1, 2]


def test_the_cli_sets_run_export_rollouts_relative_to_the_current_directory(tmp_path, monkeypatch):
    import stream_rl.controller.launch as launch
    import stream_rl.roles as roles
    from stream_rl.cli import build_parser, main
    from tests.conftest import ROOT

    seen = []

    def fake(cfg, *args, **kwargs):
        seen.append(cfg.run.export_rollouts)
        return {}

    monkeypatch.setattr(launch, "train", fake)
    monkeypatch.setattr(launch, "connect", fake)
    monkeypatch.setattr(roles, "exit_on_sigterm", lambda role=None: None)
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs" / "tiny.yaml")
    assert main(["train", "--config", config, "--export-rollouts", "rollouts", "--max-steps", "1"]) == 0
    assert main(["controller", "--config", config, "--export-rollouts", "sub/x"]) == 0
    assert main(["train", "--config", config, "--set", "run.export_rollouts=/abs/y"]) == 0
    assert main(["train", "--config", config]) == 0
    assert seen == [str(Path.cwd() / "rollouts"), str(Path.cwd() / "sub" / "x"), "/abs/y", None]
    assert build_parser().parse_args(["train", "--config", "c"]).export_rollouts is None


def test_write_cost_per_batch(tmp_path):
    """The tiny world's batch (16 groups of 8, ~100 response tokens each):
    the controller writes it while the learner trains on it."""
    groups = [Group(group_id=f"g{j}", rollouts=[
        Rollout(rollout_id=f"g{j}.{i}", group_id=f"g{j}", prompt_ids=list(range(20)), answer="7", max_tokens=320,
                response_ids=list(range(100)), logprobs=[-0.5] * 100, versions=[3] * 100, finish_reason="stop",
                reward=1.0, keep_prob=0.5) for i in range(8)]) for j in range(16)]
    ex = RolloutExport(tmp_path)
    ex.write(1, groups)
    times = []
    for step in range(2, 12):
        t = time.perf_counter()
        ex.write(step, groups)
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"\nexport write, 16 groups x 8 rollouts x 100 tokens: median {times[5] * 1e3:.2f} ms, "
          f"min {times[0] * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms; "
          f"{(tmp_path / file_name(2)).stat().st_size / 1024:.1f} KiB per file")
    assert times[5] < 1.0
