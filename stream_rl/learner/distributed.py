"""The learner's process group, for data parallelism under torchrun.

Only rank 0 talks to the buffer (and the generators); every rank must run
`Learner.step` on the same global batch, since each trains its own slice with
the global batch's normalisers and the gradients are summed over ranks (see
`Learner.step`). So rank 0 broadcasts each batch (or None: stop) to the
others, which block in `broadcast_batch` until it comes. Without torchrun
(WORLD_SIZE unset or 1) nothing is initialised and every call is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init_from_env(device: str) -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; with more than one
    rank, joins the process group (gloo on CPU, nccl on CUDA, where each
    rank takes the GPU of its LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def broadcast_batch(batch: Any | None, src: int = 0) -> Any | None:
    """Rank `src`'s `batch` on every rank. Rank src passes the payload (e.g.
    `[samples, policy_version]`, or None meaning stop); the others pass
    anything (None) and get rank src's. Pickled, so Samples travel whole."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return batch
    box = [batch if dist.get_rank() == src else None]
    # nccl sends the pickled bytes through the current CUDA device.
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=src, device=dev)
    return box[0]


def close() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
