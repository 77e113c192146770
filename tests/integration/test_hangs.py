"""A role that stops answering (SIGSTOP: a wedged process, a stuck
collective) ends a stream job within its timeout, naming it, with nothing
left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest

from stream_rl.transport import free_ports
from tests.conftest import ROOT, cfg_with

TIMEOUT_S = 5.0


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("role, key", [("learner", "learner.step_timeout_s"),
                                       ("generator", "generator.hang_timeout_s")])
def test_a_stopped_role_ends_the_job_within_its_timeout_naming_it(engine_cfg, tmp_path, role, key):
    # Ports of its own: the session's shared generator may hold engine_cfg's.
    ports = free_ports(4)
    cfg = cfg_with(engine_cfg, generator__request_addr=f"tcp://127.0.0.1:{ports[0]}",
                   generator__stream_addr=f"tcp://127.0.0.1:{ports[1]}",
                   learner__addr=f"tcp://127.0.0.1:{ports[2]}", learner__reply_addr=f"tcp://127.0.0.1:{ports[3]}")
    cfg_path = tmp_path / "job.json"
    cfg_path.write_bytes(msgspec.json.encode(cfg))
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "stream_rl", "train", "--config", str(cfg_path), "--out", str(out),
                            "--max-steps", "200", "--set", "mode=stream", "--set", f"{key}={TIMEOUT_S}",
                            "--set", "generator.max_restarts=0"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline, "the job made no 2 steps in 300 s"
            time.sleep(0.2)
        (pid,) = _pids(f"stream_rl {role} --config {out}")
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        log, _ = job.communicate(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - t0
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert f"hangs ({key}" in log, log[-2000:]
    # Its timeout, a second's check, a 2 s stop of the hung role, the rest's stop.
    print(f"{role} stopped: the job ended {took:.1f} s later")
    assert took < TIMEOUT_S + 20, f"took {took:.1f} s"
    time.sleep(1)
    assert not _pids(f"stream_rl (learner|generator) --config {out}")
