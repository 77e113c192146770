"""`run.export_rollouts` in a real run: every trained batch is in the
directory, one file per step, holding the groups metrics.jsonl says the
step trained, survivors only, each token with its log-prob and version;
a resume replaces the steps it redoes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.conftest import cfg_with

pytestmark = pytest.mark.engine


def test_train_exports_every_trained_batch(generator, engine_cfg, tmp_path):
    from datasets import load_dataset

    from stream_rl.controller.launch import train

    export = tmp_path / "rollouts"
    # ARRoL prunes from step 2 on: the pruned members are left out.
    cfg = cfg_with(engine_cfg, pruner__mode="arrol", pruner__cold_start_steps=1, pruner__min_head_auc=0.0,
                   run__export_rollouts=str(export))
    out = tmp_path / "run"
    train(cfg, out, max_steps=3, generator=generator)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(p.name for p in export.iterdir()) == [f"step_00000{s}.parquet" for s in (1, 2, 3)]
    ds = load_dataset("parquet", data_dir=str(export), split="train", cache_dir=str(tmp_path / "hf"))
    g = cfg.generator
    for rec in records:
        rows = [r for r in ds if r["step"] == rec["step"]]
        per_group = Counter(r["group_id"] for r in rows)
        assert sorted(per_group) == sorted(rec["group_ids"]) and len(per_group) == g.target_groups
        assert all(cfg.pruner.min_survivors <= n <= g.group_size for n in per_group.values())
        assert len({r["rollout_id"] for r in rows}) == len(rows)
        for r in rows:
            assert r["finish_reason"] in ("stop", "length") and r["group_size"] == g.group_size
            n = len(r["response_ids"])
            assert 0 < n <= g.max_tokens and len(r["logprobs"]) == len(r["versions"]) == n
            assert all(lp <= 0.0 for lp in r["logprobs"]) and max(r["versions"]) <= rec["policy_version"]
            assert r["reward"] in (0.0, 1.0) and 0.0 < r["inclusion"] <= 1.0 and r["prompt_ids"]
        # What the step trained on, less the pruned members' tokens.
        assert sum(len(r["response_ids"]) for r in rows) <= rec["tokens_in_batch"]
        if rec["step"] == 1:  # cold start: nothing pruned, every member trained
            assert len(rows) == g.target_groups * g.group_size
            assert sum(len(r["response_ids"]) for r in rows) == rec["tokens_in_batch"]
            assert all(r["inclusion"] == 1.0 for r in rows)
    pruned = [r for r in ds if r["step"] > 1]
    assert len(pruned) < 2 * g.target_groups * g.group_size and any(r["inclusion"] < 1.0 for r in pruned)

    # Resumed from the step-3 checkpoint the run ends with: a killed run's
    # later files go, the steps before stay as they were.
    kept = {s: (export / f"step_00000{s}.parquet").read_bytes() for s in (1, 2, 3)}
    (export / "step_000005.parquet").write_bytes(kept[3])
    train(cfg, out, max_steps=4, generator=generator, resume=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert sorted(p.name for p in export.iterdir()) == [f"step_00000{s}.parquet" for s in (1, 2, 3, 4)]
    assert all((export / f"step_00000{s}.parquet").read_bytes() == kept[s] for s in (1, 2, 3))
    ds = load_dataset("parquet", data_files=str(export / "step_000004.parquet"), split="train",
                      cache_dir=str(tmp_path / "hf"))
    assert set(ds["step"]) == {4} and sorted(set(ds["group_id"])) == sorted(records[3]["group_ids"])
