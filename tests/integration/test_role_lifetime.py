"""A role started by `stream-rl train` ends with it: SIGTERM runs the
cleanup (`exit_on_sigterm`), and a SIGKILLed parent takes its roles along
(`start_role`'s parent-death signal), so a `--resume` finds the ports free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

PARENT = """
import sys, time
from pathlib import Path
from stream_rl.roles import exit_on_sigterm, start_role
from tests.conftest import ROOT
exit_on_sigterm()
child, _ = start_role(["-c", "import time; time.sleep(120)"], Path(sys.argv[1]))
try:
    print(child.pid, flush=True)
    time.sleep(120)
finally:
    print("cleanup ran", flush=True)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # exited, not yet reaped by init


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    end = time.time() + timeout_s
    while time.time() < end:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def _start_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "child.log")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = int(parent.stdout.readline())
    assert not _gone(child)
    return parent, child


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_sigkilled_parent_takes_its_roles_along(tmp_path):
    parent, child = _start_parent(tmp_path)
    parent.kill()
    parent.wait()
    assert _wait_gone(child), "the role outlived its SIGKILLed parent"


def test_sigterm_runs_the_cleanup(tmp_path):
    parent, child = _start_parent(tmp_path)
    parent.send_signal(signal.SIGTERM)
    out, _ = parent.communicate(timeout=30)
    assert parent.returncode == 128 + signal.SIGTERM
    assert "cleanup ran" in out
    assert _wait_gone(child)  # the parent's death, as the role sees it


def test_a_dead_role_is_reported_with_its_cause_once(tmp_path):
    """The cause of a role's death is the last exception line of its log,
    said once, however many times the log repeats it (a vLLM engine that
    fails every request logs the same error for each)."""
    from stream_rl.roles import died, exit_cause, start_role

    log = tmp_path / "generator.log"
    log.write_text("INFO starting\n" + "ERROR request failed\nValueError: Head size 16 is not supported\n" * 128 +
                   "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                   "stream_rl.generator.service.GeneratorDied: model.path's model has head_dim 16, which vLLM's "
                   "CPU attention cannot serve\n")
    assert exit_cause(log) == ("stream_rl.generator.service.GeneratorDied: model.path's model has head_dim 16, "
                               "which vLLM's CPU attention cannot serve")
    proc, f = start_role(["-c", "import sys; print('bye'); sys.exit(3)"], tmp_path / "r.log")
    proc.wait()
    f.close()
    msg = died("learner", proc, tmp_path / "r.log")
    assert msg.startswith("learner process exited with code 3: bye") and "r.log" in msg
    assert exit_cause(tmp_path / "missing.log") is None


def test_stopping_a_role_that_died_stops_what_it_started(tmp_path):
    """A role killed mid-run (SIGKILL: no cleanup) leaves its own children,
    as a killed generator left its vLLM engine; stopping the role kills them."""
    from stream_rl.roles import start_role, stop_role

    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    (tmp_path / "role.py").write_text(script)
    proc, log = start_role([str(tmp_path / "role.py")], tmp_path / "role.log")
    deadline = time.time() + 30
    while not (tmp_path / "role.log").read_text().strip() and time.time() < deadline:
        time.sleep(0.05)
    grandchild = int((tmp_path / "role.log").read_text().split()[0])
    proc.kill()
    proc.wait()
    assert not _gone(grandchild)  # orphaned, still running
    stop_role(proc, ask=lambda: None, timeout_s=1.0)
    log.close()
    assert _wait_gone(grandchild), "the role's child outlived stop_role"
