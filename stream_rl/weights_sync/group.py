"""A process group of its own between the learner and the vLLM workers.

It is built directly on a TCPStore, not through `init_process_group`, so it
lives beside whatever default group the processes already have (torchrun's
data parallel group in the learner, vLLM's own in the workers).
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


def weight_group(host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 300.0):
    """Join the group (rank 0, the learner, hosts the store); blocks until
    every rank has joined. Returns the process group and its store (keep
    both alive)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    elif backend == "nccl":
        pg = dist.ProcessGroupNCCL(store, rank, world_size)
    else:
        raise ValueError(f"unknown weights_sync group backend {backend!r}; allowed: 'gloo', 'nccl'")
    return pg, store
