"""The weight-sync process group's store listens on the configured host alone."""

from __future__ import annotations

import threading

import psutil
import torch

from stream_rl.transport import free_ports
from stream_rl.weights_sync.group import weight_group


def test_the_store_listens_on_the_configured_host_only_and_the_group_works():
    port = free_ports(1)[0]
    got = {}

    def worker():
        pg, _ = weight_group("127.0.0.1", port, 1, 2, timeout_s=30)
        buf = torch.zeros(3)
        pg.broadcast(buf, 0).wait()
        got["buf"] = buf

    t = threading.Thread(target=worker)
    t.start()
    pg, store = weight_group("127.0.0.1", port, 0, 2, timeout_s=30)
    listening = [c.laddr for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    pg.broadcast(torch.tensor([1.0, 2.0, 3.0]), 0).wait()
    t.join(30)
    assert [a.ip for a in listening] == ["127.0.0.1"]  # not 0.0.0.0 or ::, every interface
    assert got["buf"].tolist() == [1.0, 2.0, 3.0]
