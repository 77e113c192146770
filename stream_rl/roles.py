"""Starting and stopping a role (`stream-rl generator`, `stream-rl learner`)
as a child process of this host."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable


def start_role(args: list[str], log_path: Path) -> tuple[subprocess.Popen, object]:
    """`python <args>` in a session of its own, output to `log_path`;
    returns the process and the open log."""
    log = open(log_path, "ab")
    proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, log


def stop_role(proc: subprocess.Popen, ask: Callable[[], None], timeout_s: float) -> None:
    """`ask` it to exit; past `timeout_s`, kill its whole session (an
    engine's own children, torchrun's ranks)."""
    if proc.poll() is None:
        try:
            ask()
            proc.wait(timeout_s)
        except Exception:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
