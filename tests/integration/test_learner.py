"""`stream-rl train` with the learner's options, against the real engine."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import cfg_with, logprob_gaps_within

pytestmark = pytest.mark.engine

OPTIONS = {
    # DAPO with every correction: Horvitz-Thompson over ARRoL's and DPPO's
    # pruning, AReaL's decoupled objective, KL to the initial policy, two
    # mini-batches, padded rows.
    "dapo-ht-decoupled": dict(learner__loss="dapo", learner__clip_high=0.28, learner__pruning_correction="ht",
                              learner__offpolicy="decoupled", learner__dppo_completion_rate=0.3,
                              learner__kl_beta=0.01, learner__minibatches=2, learner__packing=False,
                              data__dppo_prompt_rate=0.3, pruner__mode="arrol", pruner__cold_start_steps=1),
    "gspo-mask-stale": dict(learner__loss="gspo", learner__offpolicy="mask_stale", pruner__mode="random",
                            pruner__cold_start_steps=0),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_train_runs_with_learner_options(generator, engine_cfg, tmp_path, name):
    from stream_rl.controller.launch import train

    cfg = cfg_with(engine_cfg, generator__target_groups=6, **OPTIONS[name])
    train(cfg, tmp_path, max_steps=3, generator=generator)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert logprob_gaps_within(records)
    for r in records:
        assert math.isfinite(r["loss"]) and r["samples_trained"] > 0
        assert r["padding_fraction"] >= 0 and math.isclose(sum(r[f"version_lag/{b}"] for b in
                                                               ("0", "1", "2", "3", "4+")), 1.0)
    if cfg.learner.pruning_correction == "ht":
        assert max(r["ht_weight_max"] for r in records) > 1.0  # something was pruned and reweighted
    # Recycled partials are off-policy by the second step.
    assert any(r["offpolicy_token_frac"] > 0 for r in records[1:])
