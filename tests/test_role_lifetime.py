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

ROOT = Path(__file__).resolve().parents[1]

PARENT = """
import sys, time
from pathlib import Path
from stream_rl.roles import exit_on_sigterm, start_role
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
