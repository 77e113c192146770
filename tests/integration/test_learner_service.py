"""The learner process's service loop against a weight-broadcast peer that
dies mid-transfer: it reports the failure and still saves on Shutdown."""

from __future__ import annotations

import subprocess
import sys
import threading

from stream_rl.learner.service import LearnerService
from stream_rl.protocol import Decoder, FromLearner, LearnerFailed, Shutdown, SyncWeights, WeightsLoaded, WeightsStaged
from stream_rl.transport import ZmqChannel
from stream_rl.weights_sync.buckets import decode_uri
from tests.conftest import cfg_with

# A worker of the weight group that joins and dies before receiving: what a
# generator killed mid-sync leaves behind once its engine is gone.
PEER = """
import os, sys
from stream_rl.weights_sync.group import weight_group
weight_group(sys.argv[1], int(sys.argv[2]), 1, 2, "gloo", 60.0)
os._exit(0)
"""


def test_a_broadcast_to_a_dead_generator_is_reported_and_shutdown_still_saves(engine_cfg, tmp_path,
                                                                               one_torch_thread):
    cfg = cfg_with(engine_cfg, weights_sync__backend="torch_dist", generator__count=1,
                   generator__tensor_parallel_size=1)
    service = LearnerService(cfg, tmp_path)
    to_learner = ZmqChannel(cfg.learner.addr, send=True, bind=False, hwm=100)
    replies = ZmqChannel(cfg.learner.reply_addr, send=False, bind=True, hwm=100, decoder=Decoder(FromLearner))
    served: dict = {}
    thread = threading.Thread(target=lambda: served.update(steps=service.run()), daemon=True)
    thread.start()
    try:
        replies.recv(timeout_ms=60_000)  # LearnerReady
        to_learner.send(SyncWeights(version=1))
        staged = replies.recv(timeout_ms=60_000)
        assert isinstance(staged, WeightsStaged)
        group = decode_uri(staged.uri)["group"]
        peer = subprocess.run([sys.executable, "-c", PEER, group["host"], str(group["port"])], timeout=120)
        assert peer.returncode == 0
        to_learner.send(WeightsLoaded(version=1))
        failed = replies.recv(timeout_ms=120_000)
        assert isinstance(failed, LearnerFailed) and "weight broadcast failed" in failed.error
        to_learner.send(Shutdown())
        thread.join(120)
        assert not thread.is_alive() and served == {"steps": 0}
        assert (tmp_path / "final_model" / "config.json").exists()
    finally:
        to_learner.close()
        replies.close()
