"""How a set of named tensors travels as a few flat byte buffers.

Both ends of a broadcast agree on the layout from its description alone
(names, shapes, dtypes, bucket boundaries), which goes over the control
channel as JSON inside the `UpdateWeights` URI; the bytes go over the
process group, one collective per bucket instead of one per tensor.
"""

from __future__ import annotations

import json

import torch

SCHEME = "torch_dist:"
ALIGN = 16  # bytes: every tensor starts at a multiple


def plan_buckets(weights: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[dict]]:
    """Tensors in order, grouped into buckets of about `bucket_bytes` (a
    tensor larger than that is a bucket of its own)."""
    buckets: list[list[dict]] = [[]]
    size = 0
    for name, t in weights.items():
        n = t.numel() * t.element_size()
        start = -(-size // ALIGN) * ALIGN  # a byte view can be re-viewed as any dtype only when aligned
        if buckets[-1] and start + n > bucket_bytes:
            buckets.append([])
            start = 0
        buckets[-1].append({"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                            "offset": start, "nbytes": n})
        size = start + n
    return [b for b in buckets if b]


def bucket_nbytes(bucket: list[dict]) -> int:
    return bucket[-1]["offset"] + bucket[-1]["nbytes"]


def pack_bucket(weights: dict[str, torch.Tensor], bucket: list[dict], out: torch.Tensor | None = None) -> torch.Tensor:
    """The bucket's tensors as one contiguous uint8 buffer (`out`, reused
    when given: writing into fresh memory costs more than the copy)."""
    if out is None:
        out = torch.zeros(bucket_nbytes(bucket), dtype=torch.uint8)
    for e in bucket:
        t = weights[e["name"]].detach().contiguous()
        out[e["offset"]: e["offset"] + e["nbytes"]] = t.view(-1).view(torch.uint8).to(out.device)
    return out


def unpack_bucket(buf: torch.Tensor, bucket: list[dict]) -> list[tuple[str, torch.Tensor]]:
    """Named tensor views into a received bucket buffer."""
    out = []
    for e in bucket:
        raw = buf[e["offset"]: e["offset"] + e["nbytes"]]
        out.append((e["name"], raw.view(getattr(torch, e["dtype"])).view(e["shape"])))
    return out


def encode_uri(group: dict, buckets: list[list[dict]]) -> str:
    return SCHEME + json.dumps({"group": group, "buckets": buckets}, separators=(",", ":"))


def decode_uri(uri: str) -> dict:
    if not uri.startswith(SCHEME):
        raise ValueError(f"not a {SCHEME} weights URI: {uri[:40]!r}")
    return json.loads(uri[len(SCHEME):])


def group_key(group: dict) -> tuple:
    """What tells one group of a URI from another: each is built on a port of its own."""
    return (group["host"], group["port"])


def uri_group_key(uri: str) -> tuple | None:
    """The torch_dist group a weights URI goes over, None for another (or a bad) URI."""
    try:
        return group_key(decode_uri(uri)["group"])
    except Exception:
        return None
