"""File backend: safetensors written atomically, loaded in place by vLLM."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from stream_rl.weights_sync.base import WeightSender


class FileWeightSender(WeightSender):
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        return self.dir / f"weights-v{version:06d}.safetensors"

    def stage(self, weights: dict[str, torch.Tensor], version: int) -> str:
        final = self.path(version)
        tmp = final.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp),
                  metadata={"version": str(version)})
        # A generator never sees a half-written file: rename is atomic.
        os.replace(tmp, final)
        return str(final)

    def release(self, version: int) -> None:
        self.path(version).unlink(missing_ok=True)
