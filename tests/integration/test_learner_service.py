"""The learner process's service loop against a weight-broadcast peer that
dies mid-transfer: the next version goes over a new group, to the receivers
the controller names, without waiting for the dead one; Shutdown saves."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import torch

from stream_rl.learner.service import LearnerService
from stream_rl.codec import Decoder
from stream_rl.protocol import FromLearner, Receivers, Shutdown, SyncWeights, WeightsLoaded, WeightsStaged
from stream_rl.transport import ZmqChannel
from stream_rl.weights_sync.buckets import bucket_nbytes, decode_uri, unpack_bucket
from stream_rl.weights_sync.group import weight_group
from tests.conftest import cfg_with

# A worker of the weight group that joins (and is killed before receiving:
# what a generator killed mid-sync leaves behind once its engine is gone).
PEER = """
import os, sys
from stream_rl.weights_sync.group import weight_group
weight_group(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), "gloo", 60.0)
os._exit(0)
"""


def test_a_broadcast_to_a_dead_generator_is_abandoned_for_a_new_group_and_shutdown_still_saves(
        engine_cfg, tmp_path, one_torch_thread):
    cfg = cfg_with(engine_cfg, weights_sync__backend="torch_dist", generator__count=2,
                   generator__tensor_parallel_size=1, weights_sync__timeout_s=120.0)
    service = LearnerService(cfg, tmp_path)
    to_learner = ZmqChannel(cfg.learner.addr, send=True, bind=False, hwm=100)
    replies = ZmqChannel(cfg.learner.reply_addr, send=False, bind=True, hwm=100, decoder=Decoder(FromLearner))
    served: dict = {}
    thread = threading.Thread(target=lambda: served.update(steps=service.run()), daemon=True)
    thread.start()
    try:
        replies.recv(timeout_ms=60_000)  # LearnerReady
        to_learner.send(SyncWeights(version=1, receivers=Receivers(epoch=0, generators=[0, 1])))
        staged = replies.recv(timeout_ms=60_000)
        assert isinstance(staged, WeightsStaged) and staged.receivers.generators == [0, 1]
        old = decode_uri(staged.uri)["group"]
        assert old["members"] == [0, 1] and old["world_size"] == 3
        # Generator 1's worker joins and dies; generator 0's never comes: the
        # transfer is stuck in the group's formation, as after a SIGKILL.
        peer = subprocess.Popen([sys.executable, "-c", PEER, old["host"], str(old["port"]), "2", "3"])
        time.sleep(3)
        peer.kill()
        peer.wait()
        to_learner.send(WeightsLoaded(version=1))
        # The controller saw the loss: version 2 goes to generator 0 alone.
        t0 = time.monotonic()
        to_learner.send(SyncWeights(version=2, receivers=Receivers(epoch=1, generators=[0])))
        staged = replies.recv(timeout_ms=60_000)
        assert isinstance(staged, WeightsStaged) and time.monotonic() - t0 < 10  # not the 120 s timeout
        meta = decode_uri(staged.uri)
        new = meta["group"]
        assert new["port"] != old["port"] and new["members"] == [0] and new["world_size"] == 2
        got = {}

        def receive():
            pg, _ = weight_group(new["host"], new["port"], 1, 2, "gloo", 60.0)
            for bucket in meta["buckets"]:
                buf = torch.empty(bucket_nbytes(bucket), dtype=torch.uint8)
                pg.broadcast(buf, 0).wait()
                got.update(unpack_bucket(buf, bucket))

        receiver = threading.Thread(target=receive)
        receiver.start()
        receiver.join(60)
        weights = service.learner.weights_for_sync()
        assert got.keys() == weights.keys()
        assert all(torch.equal(got[k], weights[k]) for k in weights)
        assert service.sender.abandoned == 1
        to_learner.send(Shutdown())
        thread.join(120)
        assert not thread.is_alive() and served == {"steps": 0}
        assert (tmp_path / "final_model" / "config.json").exists()
    finally:
        to_learner.close()
        replies.close()
