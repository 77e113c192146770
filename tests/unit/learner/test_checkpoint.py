"""Checkpoints resume exactly: a learner (policy, AdamW, its RNGs, ARRoL's
quality head with its Adam state, replay ring and generator) and a pruner
(calibrator windows, recent scores, survival offset, RNG, step counters)
saved and loaded into fresh objects go on exactly as the originals do.
Writes are atomic; a checkpoint from another model is refused by name."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from stream_rl.config import config_from_dict
from stream_rl.protocol import Group, Rollout
from stream_rl.pruner import make_pruner
from stream_rl.pruner.base import Pruner, RandomPruner


# --- builders --------------------------------------------------------------------------------


def pruner_step(p, rng: random.Random, tag: str, l_detect: int, groups: int = 4, size: int = 8):
    """One step of scored rollouts through `p` (review at l_detect, rewards,
    end_step); returns the decisions (decision, keep_prob, q) and the metrics."""
    out = []
    for g in range(groups):
        members = []
        for i in range(size):
            r = Rollout(rollout_id=f"{tag}-{g}-{i}", group_id=f"{tag}-{g}", prompt_ids=[1], answer="1",
                        max_tokens=4 * l_detect)
            r.response_ids, r.score = list(range(l_detect)), rng.gauss(0.0, 2.0)
            members.append(r)
        for r in members:
            p.review(r, members)
            pruned = r.decision == "pruned"
            r.finish_reason = "pruned" if pruned else "stop"
            r.reward = None if pruned else float(rng.random() < 1 / (1 + math.exp(-r.score)))
        out.append(Group(group_id=f"{tag}-{g}", rollouts=members))
    decisions = [(r.decision, r.keep_prob, r.q) for g in out for r in g.rollouts]
    return decisions, p.end_step(out)


def same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


# --- the learner ---------------------------------------------------------------------------


# --- the pruner alone --------------------------------------------------------------------------

def pruner_cfg(**kw):
    base = dict(mode="arrol", l_detect=8, kappa=0.5, rho=0.5, lam=0.5, p_min=0.05, p_max=1.0, bins=8,
                alpha=1.0, cold_start_steps=1, exempt_fraction=0.2, min_survivors=2, small_groups="keep",
                calib_window=40, score_window=30)
    base.update(kw)
    return config_from_dict({"pruner": base, "generator": {"max_tokens": 128}, "run": {"seed": 5}})


@pytest.mark.parametrize("mode", ["arrol", "random"])
def test_pruner_state_round_trip(mode):
    """A pruner after some steps, saved (through JSON) and loaded into a fresh
    one, makes the same next decisions with the same keep_prob and draws;
    a fresh one without the state does not."""
    cfg = pruner_cfg(mode=mode)
    p = make_pruner(cfg)
    rng = random.Random(0)
    for k in range(3):  # windows overflow (calib_window 40, score_window 30)
        pruner_step(p, rng, f"s{k}", 8)
    state = json.loads(json.dumps(p.state_dict()))
    q, fresh, no_rng = make_pruner(cfg), make_pruner(cfg), make_pruner(cfg)
    q.load_state_dict(state)
    no_rng.load_state_dict({**state, "rng": fresh.state_dict()["rng"]})
    assert q.state_dict() == p.state_dict()
    if mode == "arrol":
        np.testing.assert_array_equal(q.calibrator.table(), p.calibrator.table())
        for x, y in zip(q.calibrator.counts(), p.calibrator.counts()):
            np.testing.assert_array_equal(x, y)
        assert len(p.recent_scores) == 30 and p.policy.delta != 0.0
    dp, mp_ = pruner_step(p, random.Random(9), "next", 8)
    dq, mq = pruner_step(q, random.Random(9), "next", 8)
    df, _ = pruner_step(fresh, random.Random(9), "next", 8)
    dn, _ = pruner_step(no_rng, random.Random(9), "next", 8)
    assert dp == dq and same_metrics(mp_, mq) and p.summary().keys() == q.summary().keys()
    assert {d for d, _, _ in dp} >= {"kept", "pruned"}
    assert df != dp and dn != dp  # without the state, or without its RNG, the decisions differ
    assert q.rng.random() == p.rng.random()


def test_pruner_state_kind_checked():
    p = RandomPruner(pruner_cfg(mode="random").pruner, 0)
    with pytest.raises(ValueError, match="RandomPruner"):
        make_pruner(pruner_cfg()).load_state_dict(p.state_dict())
    none = Pruner()
    none.load_state_dict(json.loads(json.dumps(none.state_dict())))
    with pytest.raises(ValueError, match="bins"):
        make_pruner(pruner_cfg(bins=4)).load_state_dict(make_pruner(pruner_cfg()).state_dict())


# --- the job checkpoint: assembled beside the last one, swapped in whole -----------

def test_find_checkpoint_prefers_the_newest_complete_one(tmp_path):
    from stream_rl.learner.checkpoint import CONTROLLER_FILE, commit_checkpoint, find_checkpoint, staging_path

    path = tmp_path / "checkpoint"

    def make(p, step, complete=True):
        p.mkdir()
        (p / "meta.json").write_text("{}")
        if complete:
            (p / CONTROLLER_FILE).write_text(json.dumps({"step": step}))

    def step_of(p):
        return json.loads((p / CONTROLLER_FILE).read_text())["step"]

    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(path)
    make(staging_path(path), 2)
    commit_checkpoint(staging_path(path), path)
    assert step_of(find_checkpoint(path)) == 2 and not staging_path(path).exists()
    # Killed while the learner's part of step 4 was written: step 2 stands.
    make(staging_path(path), 4, complete=False)
    assert find_checkpoint(path) == path
    (staging_path(path) / CONTROLLER_FILE).write_text(json.dumps({"step": 4}))
    # Killed after the controller's part, before or during the swap: step 4.
    assert step_of(find_checkpoint(path)) == 4
    path.rename(path.with_name("checkpoint.prev"))  # killed between the swap's two renames
    assert step_of(find_checkpoint(path)) == 4
    commit_checkpoint(staging_path(path), path)
    assert step_of(find_checkpoint(path)) == 4
    # Two generations are kept: the newest and the one before.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.prev"]
    make(staging_path(path), 6)
    commit_checkpoint(staging_path(path), path)
    assert [step_of(p) for p in (path, path.with_name("checkpoint.prev"))] == [6, 4]


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_one_before_naming_the_damage(tmp_path, caplog):
    from stream_rl.learner.checkpoint import CONTROLLER_FILE, commit_checkpoint, find_checkpoint, staging_path

    path = tmp_path / "checkpoint"
    for step in (2, 4):
        staged = staging_path(path)
        (staged / "model").mkdir(parents=True)
        (staged / "meta.json").write_text("{}")
        (staged / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 40)
        (staged / CONTROLLER_FILE).write_text(json.dumps({"step": step}))
        commit_checkpoint(staged, path)
    weights = path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: a disk that filled up
    with caplog.at_level("WARNING"):
        found = find_checkpoint(path)
    assert json.loads((found / CONTROLLER_FILE).read_text())["step"] == 2
    assert "model/model.safetensors is 1000 bytes, 10240 when it was written" in caplog.text
    # Changed in place, same size: the CRC tells.
    prev = found / "model" / "model.safetensors"
    prev.write_bytes(bytes(reversed(prev.read_bytes())))
    with pytest.raises(FileNotFoundError, match=r"checkpoint: .*\(truncated\?\).*checkpoint.prev: .*CRC-32"):
        find_checkpoint(path)
