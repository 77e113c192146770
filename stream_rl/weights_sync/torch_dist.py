"""torch_dist backend: the learner broadcasts the weights to the vLLM workers
over a process group of their own, in buckets, while generation goes on.

`stage` packs the weights into reused bucket buffers and returns a URI that
describes the group and the bucket layout; a background thread broadcasts
the buckets, so the learner may train on as soon as `stage` returns. The
generator has its
workers receive into staging buffers, also in the background, and pauses
generation only to load the staged weights in place (see the generator
service). The group (rank 0: the learner; rank 1 + g x tp + w: worker w of
generator g) is built on the first sync.
"""

from __future__ import annotations

import threading

import torch

from stream_rl.transport import free_ports
from stream_rl.weights_sync.base import WeightSender, WeightSyncFailed
from stream_rl.weights_sync.buckets import bucket_nbytes, encode_uri, pack_bucket, plan_buckets
from stream_rl.weights_sync.group import weight_group


class TorchDistWeightSender(WeightSender):
    def __init__(self, n_workers: int, bucket_mb: int, device: str = "cpu", host: str = "127.0.0.1",
                 timeout_s: float = 300.0):
        self.group = {"host": host, "port": free_ports(1)[0], "world_size": 1 + n_workers,
                      "backend": "nccl" if device.startswith("cuda") else "gloo", "timeout_s": timeout_s}
        self.bucket_bytes = bucket_mb * 2 ** 20
        self.device = device
        self._pg = self._store = None
        self._thread: threading.Thread | None = None
        self._buffers: list[torch.Tensor] = []  # reused from sync to sync
        self._error: BaseException | None = None

    def stage(self, weights: dict[str, torch.Tensor], version: int) -> str:
        self._finish()  # one transfer at a time: its buffers are reused
        buckets = plan_buckets(weights, self.bucket_bytes)
        sizes = [bucket_nbytes(b) for b in buckets]
        if [b.numel() for b in self._buffers] != sizes:
            dev = self.device if self.group["backend"] == "nccl" else "cpu"
            self._buffers = [torch.zeros(n, dtype=torch.uint8, device=dev) for n in sizes]
        # Packed here, so the learner may change its weights (train the next
        # step) as soon as this returns; only the broadcast is left to the thread.
        for bucket, buf in zip(buckets, self._buffers):
            pack_bucket(weights, bucket, buf)
        self._thread = threading.Thread(target=self._send, name=f"weights-v{version}", daemon=True)
        self._thread.start()
        return encode_uri(self.group, buckets)

    def _send(self) -> None:
        try:
            if self._pg is None:
                g = self.group
                self._pg, self._store = weight_group(g["host"], g["port"], 0, g["world_size"], g["backend"],
                                                     g["timeout_s"])
            # Each broadcast is queued as soon as the previous one is: the
            # backend pipelines them.
            works = [self._pg.broadcast(buf, 0) for buf in self._buffers]
            for work in works:
                work.wait()
        except BaseException as err:  # reported by release()/the next stage()
            self._error = err

    def _finish(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise WeightSyncFailed(f"weight broadcast failed: {type(err).__name__}: {err}") from err

    def release(self, version: int) -> None:
        self._finish()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._pg = self._store = None
        self._buffers = []
