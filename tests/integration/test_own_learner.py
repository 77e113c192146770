"""`examples/own_learner.py` as a user runs it: a plain torch loop that
trains the tiny model through `RolloutSource`, which starts the generator
and the controller (`stream-rl train --external-learner`) against the real
engine; its weights reach the engine every step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import psutil
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.engine

STEPS = 3


def test_the_example_trains_through_the_source_and_its_weights_reach_the_engine(tiny_world, tmp_path):
    d = tiny_world["dir"]
    sets = [f"model.path={d / 'model'}", f"data.path={d / 'data' / 'train.jsonl'}", "run.progress=false",
            *[f"{k}=tcp://127.0.0.1:{free_port()}" for k in ("generator.request_addr", "generator.stream_addr",
                                                               "learner.addr", "learner.reply_addr")]]
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples" / "own_learner.py"), "--steps", str(STEPS), "--out", str(out)]
    # The example imports stream_rl from this tree, as the job it starts does (not from wherever it is installed).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"^step (\d+): reward ([\d.]+) loss ([-+\d.e]+) serves v(\d+)$", proc.stdout, re.M)
    assert [int(s) for s, *_ in lines] == list(range(1, STEPS + 1))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # The loop's own metrics and the source's, in the job's record.
    assert [r["loss"] for r in records] == pytest.approx([float(loss) for _, _, loss, _ in lines], abs=1e-4)
    assert all(r["source_s"] > 0 and r["tokens_trained"] > 0 and "head_loss" in r for r in records)
    # Every update's weights were staged and served: the engine ends on the last.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generator_versions"] == [int(lines[-1][3])]
    versions = [int(v) for *_, v in lines]
    assert versions == list(range(versions[0], versions[0] + STEPS))
    assert (out / "controller.log").exists()
    # Nothing of the job outlives it.
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]


def test_a_job_with_its_own_learner_checkpoints_and_resumes(engine_cfg, tmp_path):
    """The controller's checkpoints hold the learner's state where its
    `on_checkpoint` put it (and the source's quality head); a source made
    with `resume=True` continues after the checkpoint's step, from that
    state, on the same ledger of groups."""
    import torch
    from transformers import AutoModelForCausalLM

    from stream_rl import RolloutSource
    from tests.conftest import cfg_with

    cfg = cfg_with(engine_cfg, run__checkpoint_every=2, generator__enforce_eager=True,
                   **{f"learner__{k}": f"tcp://127.0.0.1:{free_port()}" for k in ("addr", "reply_addr")},
                   **{f"generator__{k}": f"tcp://127.0.0.1:{free_port()}" for k in ("request_addr", "stream_addr")})
    out = tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path)

    def save(path, step):
        torch.save({"step": step, "bias": model.model.norm.weight[0].item()}, path / "mine.pt")

    def train(source, steps):
        for batch in source:
            steps.append(batch.step)
            with torch.no_grad():
                model.model.norm.weight.add_(0.01)  # an "update" the checkpoint must carry
            source.update_weights(model)

    first, second = [], []
    with RolloutSource(cfg, out, weights=model, max_steps=3, on_checkpoint=save) as source:
        train(source, first)
    norm_after_3 = model.model.norm.weight[0].item()
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path)  # a fresh process, as after a crash
    with RolloutSource(cfg, out, weights=model, max_steps=5, on_checkpoint=save, resume=True) as source:
        mine = torch.load(source.resumed_from / "mine.pt")
        assert mine["step"] == 3 and (source.resumed_from / "head.pt").exists()
        with torch.no_grad():
            model.model.norm.weight.fill_(mine["bias"])
        train(source, second)
    assert first == [1, 2, 3] and second == [4, 5] and mine["bias"] == pytest.approx(norm_after_3)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    trained = [g for r in records for g in r["group_ids"]]
    assert len(trained) == len(set(trained))  # each group trained once across the resume
