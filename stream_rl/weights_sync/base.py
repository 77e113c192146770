"""The weight-transport interface between the learner and the generators.

A sender stages a full set of checkpoint-format weights for a version and
returns a URI; the generator is told `UpdateWeights(version, uri)` and loads
from it with its worker extension. Backends differ only in where the bytes go.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from stream_rl.protocol import Receivers


class WeightSender(ABC):
    @abstractmethod
    def stage(self, weights: dict[str, torch.Tensor], version: int, receivers: Receivers | None = None) -> str:
        """Make `weights` available as `version` to `receivers` (None: every
        generator); return the URI to load. A transfer that failed, or one
        to receivers of an earlier epoch, must not hold this one up."""

    @abstractmethod
    def release(self, version: int) -> None:
        """The generators have loaded `version`: its staged copy may go."""

    def close(self) -> None:
        pass
