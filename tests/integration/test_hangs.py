"""A role that stops answering (SIGSTOP: a wedged process, a stuck
collective) ends a stream job within its timeout, naming it, with nothing
left running."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.integration.jobs import finish, running, start_train, wait_steps

TIMEOUT_S = 5.0


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("role, key", [("learner", "learner.step_timeout_s"),
                                       ("generator", "generator.hang_timeout_s")])
def test_a_stopped_role_ends_the_job_within_its_timeout_naming_it(engine_cfg, tmp_path, role, key):
    _, out, job = start_train(engine_cfg, tmp_path, 200, sets=("mode=stream", f"{key}={TIMEOUT_S}",
                                                                "generator.max_restarts=0"))
    with running(job):
        wait_steps(job, out, 2)
        (pid,) = _pids(f"stream_rl {role} --config {out}")
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        log = finish(job, TIMEOUT_S + 60)
        took = time.monotonic() - t0
    assert job.returncode != 0
    assert f"hangs ({key}" in log, log[-2000:]
    # Its timeout, a second's check, a 2 s stop of the hung role, the rest's stop.
    print(f"{role} stopped: the job ended {took:.1f} s later")
    assert took < TIMEOUT_S + 20, f"took {took:.1f} s"
    time.sleep(1)
    assert not _pids(f"stream_rl (learner|generator) --config {out}")
