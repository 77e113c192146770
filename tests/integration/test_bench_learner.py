"""`stream-rl bench learner` on a small batch of the tiny world (no engine)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cfg_with


def test_bench_learner_reports_every_config(engine_cfg, tmp_path):
    from benchmarks.learner import CONFIGS, config_name, main

    # Seeded: 4 prompts whose responses (19 to 68 tokens) pad a padded batch
    # by about 40%; rows of 128 tokens pack them far tighter.
    cfg = cfg_with(engine_cfg, generator__target_groups=4, generator__max_tokens=64, learner__pack_row_tokens=128)
    main(cfg, str(tmp_path / "out.json"), 1)
    res = json.loads((tmp_path / "out.json").read_text())
    for key in ("logprob_speedup", "update_speedup", "packing_logprob_speedup", "packing_update_speedup",
                "pruning_logprob_speedup", "pruning_update_speedup", "padding_fraction", "targets", "setup", "configs"):
        assert key in res
    assert set(res["configs"]) == {config_name(k, p) for k, p in CONFIGS}
    G = cfg.generator.group_size
    for name, c in res["configs"].items():
        assert c["logprob_s"] > 0 and c["update_s"] > 0
        assert c["sequences"] == (4 * G if c["kappa"] == 1.0 else 4 * (G // 2))
        assert 0 < c["response_tokens"] < c["total_tokens"] <= c["forward_tokens"]
        assert 0.0 <= c["padding_fraction"] < 1.0
        # The update pass skips the samples without gradient; on the same samples its layout is the log-prob pass's.
        assert 0 <= c["update_samples_without_gradient"] < c["sequences"]
        if c["update_samples_without_gradient"] == 0:
            assert c["update_padding_fraction"] == pytest.approx(c["padding_fraction"])
        else:
            assert 0.0 <= c["update_padding_fraction"] < 1.0
        # Both passes see the sampler's log-probs on the checkpoint's weights.
        assert c["rollout_logprob_abs_diff"] < 1e-3
    for kappa in (1.0, 0.5):
        packed, padded = res["configs"][config_name(kappa, True)], res["configs"][config_name(kappa, False)]
        assert packed["padding_fraction"] < padded["padding_fraction"]
        assert packed["logprob_max_abs_diff_vs_padded"] < 1e-4
    assert res["padding_fraction"] == res["configs"][config_name(0.5, True)]["padding_fraction"]
    assert res["setup"]["groups"] == 4 and res["setup"]["repeats"] == 1
    assert all(isinstance(v, bool) for v in res["targets"].values())


def test_bench_learner_rejects_bad_arguments(engine_cfg, tmp_path):
    from benchmarks.common import BenchSetupError
    from benchmarks.learner import bench_learner

    with pytest.raises(BenchSetupError, match="repeats"):
        bench_learner(engine_cfg, 0)
    with pytest.raises(BenchSetupError, match="prepare-tiny"):
        bench_learner(cfg_with(engine_cfg, model__path=str(tmp_path)), 1)
