"""File and shm backends: safetensors written atomically (to the run
directory, or to /dev/shm: memory, no disk), loaded in place by vLLM."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from stream_rl.protocol import Receivers
from stream_rl.weights_sync.base import WeightSender


class FileWeightSender(WeightSender):
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def shm_dir(run_dir) -> Path:
        """A directory in shared memory for this run (the disk if there is none)."""
        import hashlib

        base = Path("/dev/shm")
        tag = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
        return (base if base.is_dir() else Path(run_dir)) / f"stream-rl-weights-{tag}"

    def close(self) -> None:
        for f in self.dir.glob("weights-v*.safetensors"):
            f.unlink(missing_ok=True)
        try:
            self.dir.rmdir()  # only if nothing else is in it
        except OSError:
            pass

    def path(self, version: int) -> Path:
        return self.dir / f"weights-v{version:06d}.safetensors"

    def stage(self, weights: dict[str, torch.Tensor], version: int, receivers: Receivers | None = None) -> str:
        final = self.path(version)
        tmp = final.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp),
                  metadata={"version": str(version)})
        # A generator never sees a half-written file: rename is atomic.
        os.replace(tmp, final)
        return str(final)

    def release(self, version: int) -> None:
        self.path(version).unlink(missing_ok=True)
