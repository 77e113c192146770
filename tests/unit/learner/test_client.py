"""The controller's handle on the learner, over real sockets."""

from __future__ import annotations

import pytest

from stream_rl.config import config_from_dict
from stream_rl.learner.client import LearnerClient, LearnerError
from stream_rl.protocol import StepDone, WeightsStaged
from stream_rl.transport import ZmqChannel, free_ports


@pytest.fixture
def client_and_learner():
    reply, batch = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    cfg = config_from_dict({"learner": {"reply_addr": reply, "addr": batch}})
    client = LearnerClient(cfg)
    learner = ZmqChannel(reply, send=True, bind=False, hwm=100)  # what the learner sends on
    yield client, learner
    learner.close()
    client.close()


def test_a_duplicate_stray_or_forged_reply_is_skipped_and_counted(client_and_learner):
    client, learner = client_and_learner
    for msg in (StepDone(step=99999, stats={}), WeightsStaged(version=3, uri="x"), StepDone(step=1, stats={}),
                StepDone(step=2, stats={"loss": 0.5})):
        learner.send(msg)
    done = client.wait_for(StepDone, 10.0, "step 2", match=lambda m: m.step == 2)
    assert done.step == 2 and done.stats == {"loss": 0.5} and client.stray == 3
    with pytest.raises(LearnerError, match="timed out after 1 s waiting for step 3: the learner hangs"):
        client.wait_for(StepDone, 1.0, "step 3", match=lambda m: m.step == 3)
