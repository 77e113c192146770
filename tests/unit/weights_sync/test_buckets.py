"""Weight-sync pieces that need no engine: the bucket layout and the backends' choice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.weights_sync.buckets import (bucket_nbytes, decode_uri, encode_uri, pack_bucket, plan_buckets,
                                            unpack_bucket)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


@settings(max_examples=50, deadline=None)
@given(shapes=st.lists(st.tuples(st.lists(st.integers(1, 6), min_size=0, max_size=3), st.sampled_from(DTYPES)),
                       min_size=1, max_size=12),
       bucket_bytes=st.integers(1, 400))
def test_buckets_round_trip_every_tensor_bit_for_bit(shapes, bucket_bytes):
    gen = torch.Generator().manual_seed(0)
    weights = {f"w{i}": (torch.randn(s, generator=gen) * 100).to(dt) for i, (s, dt) in enumerate(shapes)}
    buckets = plan_buckets(weights, bucket_bytes)
    assert [e["name"] for b in buckets for e in b] == list(weights)  # each once, in order
    for b in buckets:  # a bucket holds about bucket_bytes; only a lone tensor may exceed it
        assert bucket_nbytes(b) <= bucket_bytes or len(b) == 1
    out = {}
    for b in buckets:
        buf = pack_bucket(weights, b).clone()  # what the receiver gets
        out.update(unpack_bucket(buf, b))
    assert list(out) == list(weights)
    for k, t in weights.items():
        assert out[k].dtype == t.dtype and out[k].shape == t.shape and torch.equal(out[k], t)


def test_uri_carries_group_and_layout():
    weights = {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    group = {"host": "127.0.0.1", "port": 1234, "world_size": 2, "backend": "gloo", "timeout_s": 5.0}
    meta = decode_uri(encode_uri(group, plan_buckets(weights, 1 << 20)))
    assert meta["group"] == group
    assert [(e["name"], e["shape"], e["dtype"]) for e in meta["buckets"][0]] == [("a", [2, 3], "float32"),
                                                                                 ("b", [4], "bfloat16")]
    with pytest.raises(ValueError, match="torch_dist"):
        decode_uri("/tmp/weights.safetensors")


@pytest.mark.parametrize("backend", ["torch_dist", "shm", "file"])
def test_make_weight_sender_follows_the_config(backend, tmp_path):
    from stream_rl.config import config_from_dict
    from stream_rl.weights_sync import make_weight_sender
    from stream_rl.weights_sync.file import FileWeightSender
    from stream_rl.weights_sync.torch_dist import TorchDistWeightSender

    sender = make_weight_sender(config_from_dict({"weights_sync": {"backend": backend}}), tmp_path)
    try:
        if backend == "torch_dist":
            assert isinstance(sender, TorchDistWeightSender) and sender.group["world_size"] == 2
        else:
            assert isinstance(sender, FileWeightSender)
            assert str(sender.dir).startswith("/dev/shm") == (backend == "shm")
            uri = sender.stage({"x": torch.ones(3)}, 1)
            assert uri.endswith("weights-v000001.safetensors")
            sender.release(1)
    finally:
        sender.close()
