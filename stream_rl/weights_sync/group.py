"""A process group of its own between the learner and the vLLM workers.

It is built directly on a TCPStore, not through `init_process_group`, so it
lives beside whatever default group the processes already have (torchrun's
data parallel group in the learner, vLLM's own in the workers).
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist


def listening_socket(host: str, port: int) -> int:
    """A socket listening on `host`:`port` only, handed over as a file
    descriptor: a TCPStore master given no socket listens on every
    interface, whatever host it is told."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock.detach()  # the store owns it from here


def weight_group(host: str, port: int, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 300.0):
    """Join the group (rank 0, the learner, hosts the store, listening on
    `host` alone); blocks until every rank has joined. Returns the process group and its store (keep
    both alive)."""
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=listening_socket(host, port))
    else:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    elif backend == "nccl":
        pg = dist.ProcessGroupNCCL(store, rank, world_size)
    else:
        raise ValueError(f"unknown weights_sync group backend {backend!r}; allowed: 'gloo', 'nccl'")
    return pg, store
