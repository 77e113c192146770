"""The pruners: which rollouts to stop inside the engine (none, random, ARRoL)."""

from __future__ import annotations

from stream_rl.pruner.arrol import ArrolPruner
from stream_rl.pruner.base import Pruner, RandomPruner


def make_pruner(cfg) -> Pruner:
    """The pruner `cfg.pruner.mode` names, seeded from `cfg.run.seed`."""
    mode = cfg.pruner.mode
    if mode == "none":
        return Pruner()
    if mode == "random":
        return RandomPruner(cfg.pruner, cfg.run.seed)
    if mode == "arrol":
        return ArrolPruner(cfg.pruner, cfg.run.seed)
    raise ValueError(f"unknown pruner.mode {mode!r}")
