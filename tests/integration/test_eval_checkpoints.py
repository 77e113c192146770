"""The voting rules of `stream-rl eval` on hand-made candidate sets, and
their properties (hypothesis); the answer key; the head file beside a final
model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stream_rl.eval.checkpoint import CheckpointError, resolve_checkpoint
from stream_rl.learner.checkpoint import FINAL_HEAD_FILE

# --- majority ------------------------------------------------------------------


# --- weighted vote ------------------------------------------------------------------


# --- quality-head ranks --------------------------------------------------------------


# --- DeepConf --------------------------------------------------------------------------


# --- properties --------------------------------------------------------------------------


# --- the answer key ---------------------------------------------------------------------


# --- summaries ------------------------------------------------------------------------------


# --- where the head comes from ----------------------------------------------------------------


def test_final_model_carries_the_head_and_eval_reads_it(engine_cfg, tmp_path):
    """save_final writes quality_head.pt beside the model (never a second
    *.safetensors, which vLLM would load as model weights); eval reads it
    back, and a model directory without one has no head."""
    from tests.conftest import cfg_with
    from stream_rl.learner.service import LearnerService
    from stream_rl.learner.trainer import Learner

    cfg = cfg_with(engine_cfg, pruner__mode="arrol", pruner__l_detect=24)
    learner = Learner(cfg)
    LearnerService.save_final(SimpleNamespace(out=tmp_path, learner=learner, cfg=cfg))
    final = tmp_path / "final_model"
    assert (final / FINAL_HEAD_FILE).is_file()
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    src = resolve_checkpoint(final)
    assert src.kind == "model" and src.model_dir == final and src.head_l_detect == 24
    for name, t in learner.head_trainer.head.named_for_sync().items():
        assert torch.equal(src.head[name], t)

    plain = resolve_checkpoint(engine_cfg.model.path)
    assert plain.head is None and plain.run_config is None
    with pytest.raises(CheckpointError, match="neither"):
        resolve_checkpoint(tmp_path)


def test_checkpoint_and_run_directory_resolve_with_the_run_config(engine_cfg, tmp_path):
    """A run directory means its newest job checkpoint; the run's config.json
    beside it is eval's default config; a checkpoint without a head has none."""
    import msgspec

    from tests.conftest import cfg_with
    from stream_rl.eval.checkpoint import default_config
    from stream_rl.learner.checkpoint import CONTROLLER_FILE, save_checkpoint
    from stream_rl.learner.trainer import Learner

    run = tmp_path / "run"
    cfg = cfg_with(engine_cfg, pruner__mode="arrol")
    learner = Learner(cfg)
    save_checkpoint(run / "checkpoint", learner, step=3, version=3)
    (run / "checkpoint" / CONTROLLER_FILE).write_text("{}")
    (run / "config.json").write_bytes(msgspec.json.encode(cfg))
    for path in (run, run / "checkpoint"):
        src = resolve_checkpoint(path)
        assert src.kind == "checkpoint" and src.path == run / "checkpoint"
        assert src.weights_file == run / "checkpoint" / "model" / "model.safetensors" and src.model_dir is None
        assert set(src.head) == set(learner.head_trainer.head.named_for_sync())
        assert default_config(path) == run / "config.json"

    plain = tmp_path / "plain"
    save_checkpoint(plain, Learner(cfg_with(engine_cfg, pruner__mode="none")), step=1, version=1)  # no head
    assert resolve_checkpoint(plain).head is None
    with pytest.raises(CheckpointError, match="pass --config"):
        default_config(plain)
    (run / "checkpoint" / "head.pt").unlink()
    with pytest.raises(CheckpointError, match="head.pt is missing"):
        resolve_checkpoint(run / "checkpoint")
