"""torch_dist backend: the learner broadcasts the weights to the vLLM workers
over a process group of their own, in buckets, while generation goes on.

`stage` packs the weights into bucket buffers and returns a URI that
describes the group and the bucket layout; a background thread broadcasts
the buckets, so the learner may train on as soon as `stage` returns. The
generator has its workers receive into staging buffers, also in the
background, and pauses generation only to load the staged weights in place
(see the generator service).

The group (rank 0: the learner; rank 1 + k x tp + w: worker w of the k-th
receiving generator) is built on the first sync and again whenever the
receivers change (`Receivers.epoch`: a generator was lost or rejoined) or a
transfer failed, each time on a fresh port. A transfer of an earlier group
is abandoned, never joined: its peer may be dead, and gloo would wait for
it until `weights_sync.timeout_s`.
"""

from __future__ import annotations

import logging
import threading

import torch

from stream_rl.protocol import Receivers
from stream_rl.transport import free_ports
from stream_rl.weights_sync.base import WeightSender
from stream_rl.weights_sync.buckets import bucket_nbytes, encode_uri, pack_bucket, plan_buckets
from stream_rl.weights_sync.group import weight_group

log = logging.getLogger(__name__)


class _Group:
    """A group of receivers: what the URI tells them, and the process group
    the first transfer over it builds."""

    def __init__(self, key: tuple, spec: dict):
        self.key, self.spec = key, spec
        self.pg = self.store = None


class _Transfer:
    """One version's broadcast, in its own thread."""

    def __init__(self, group: _Group, version: int):
        self.group, self.version = group, version
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None


class TorchDistWeightSender(WeightSender):
    def __init__(self, generators: int, workers_per_generator: int, bucket_mb: int, device: str = "cpu",
                 host: str = "127.0.0.1", timeout_s: float = 300.0):
        self.all_generators = list(range(generators))
        self.tp = workers_per_generator
        self.backend = "nccl" if device.startswith("cuda") else "gloo"
        self.host, self.timeout_s = host, timeout_s
        self.bucket_bytes = bucket_mb * 2 ** 20
        self.device = device
        self._transfer: _Transfer | None = None
        self._buffers: list[torch.Tensor] = []  # reused from sync to sync, within a group
        self.abandoned = 0  # transfers left to their fate when the receivers changed
        self._group = self._new_group((0, tuple(self.all_generators)))

    @property
    def transfer_thread(self) -> threading.Thread | None:
        """The latest transfer's broadcast thread (`bench weight-sync` times it)."""
        return self._transfer.thread if self._transfer is not None else None

    @property
    def group(self) -> dict:
        """What the URI tells the receivers about the current group."""
        return self._group.spec

    def stage(self, weights: dict[str, torch.Tensor], version: int, receivers: Receivers | None = None) -> str:
        gens = receivers.generators if receivers is not None else self.all_generators
        key = (receivers.epoch if receivers is not None else 0, tuple(gens))
        if key != self._group.key or not self._finish():
            self._group = self._new_group(key)
        buckets = plan_buckets(weights, self.bucket_bytes)
        sizes = [bucket_nbytes(b) for b in buckets]
        if [b.numel() for b in self._buffers] != sizes:
            dev = self.device if self.backend == "nccl" else "cpu"
            self._buffers = [torch.zeros(n, dtype=torch.uint8, device=dev) for n in sizes]
        # Packed here, so the learner may change its weights (train the next
        # step) as soon as this returns; only the broadcast is left to the thread.
        for bucket, buf in zip(buckets, self._buffers):
            pack_bucket(weights, bucket, buf)
        t = self._transfer = _Transfer(self._group, version)
        t.thread = threading.Thread(target=self._send, args=(t, list(self._buffers)),
                                    name=f"weights-v{version}", daemon=True)
        t.thread.start()
        return encode_uri(self.group, buckets)

    def _new_group(self, key: tuple) -> _Group:
        """A group for `key`'s receivers on a fresh port; a transfer still
        running on the old one is abandoned with its buffers."""
        if self._transfer is not None and self._transfer.thread.is_alive():
            log.warning("weights version %d: abandoning its transfer (the receivers changed, or it failed)",
                        self._transfer.version)
            self.abandoned += 1
            self._buffers = []  # the abandoned thread may still read them
        self._transfer = None
        return _Group(key, {"host": self.host, "port": free_ports(1)[0], "world_size": 1 + len(key[1]) * self.tp,
                            "backend": self.backend, "timeout_s": self.timeout_s, "members": list(key[1]),
                            "tp": self.tp})

    def _send(self, t: _Transfer, buffers: list[torch.Tensor]) -> None:
        g = t.group
        try:
            if g.pg is None:  # the group's first transfer: every receiver joins now
                s = g.spec
                g.pg, g.store = weight_group(s["host"], s["port"], 0, s["world_size"], s["backend"], s["timeout_s"])
            pg = g.pg
            # Each broadcast is queued as soon as the previous one is: the
            # backend pipelines them.
            works = [pg.broadcast(buf, 0) for buf in buffers]
            for work in works:
                work.wait()
        except BaseException as err:  # seen by the next stage(), which builds a new group
            t.error = err

    def _finish(self) -> bool:
        """Wait for the current group's last transfer (its buffers are
        reused); False if it failed: the group is rebuilt."""
        t = self._transfer
        if t is None:
            return True
        t.thread.join()
        self._transfer = None
        if t.error is not None:
            log.warning("weights version %d: broadcast failed (%s: %s); the next version goes over a new group",
                        t.version, type(t.error).__name__, t.error)
            return False
        return True

    def release(self, version: int) -> None:
        pass  # the buffers are reused by the next stage, which waits for the transfer

    def close(self) -> None:
        t = self._transfer
        if t is not None and t.thread.is_alive():
            t.thread.join(timeout=5.0)
        self._group.pg = self._group.store = None
        self._buffers = []
