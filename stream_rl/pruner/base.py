"""The pruner stage: sees every rollout as its tokens stream in.

`review` is called after each chunk is appended and returns whether the
rollout should keep generating. The pass-through pruner keeps everything;
ARRoL's learned pruning (issue #4) plugs in behind the same method.
"""

from __future__ import annotations

from stream_rl.buffer.rollouts import Rollout


class Pruner:
    def review(self, rollout: Rollout) -> bool:
        """True to keep generating `rollout`, False to abort it now."""
        return True


def make_pruner(cfg) -> Pruner:
    assert cfg.pruner.mode == "none"  # the only mode the config admits today
    return Pruner()
