"""Starting and stopping a role (`stream-rl generator`, `stream-rl learner`)
as a child process of this host."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def _exit_with_parent(parent: int) -> None:
    """In the child: SIGTERM when the parent dies (Linux), so a SIGKILLed
    `stream-rl train` (or Ray actor) does not leave its engines running on
    the ports a `--resume` or a restart needs. A parent that died between
    the fork and this call sent nothing: the child ends at once."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)


# The stop signal this process received, if any: a role's shutdown that
# follows it is no failure to report (a generator's cancelled tasks).
received: int | None = None


def exit_on_sigterm(role: str | None = None) -> None:
    """SIGTERM (and, with `role`, Ctrl-C's SIGINT) raises SystemExit, so
    `finally` blocks stop a role's children (Python's default would end the
    process without them). With `role` it says so on stderr at once: a stop
    takes seconds, and silence read as a hang."""
    def handler(signum, frame):
        global received
        received = signum
        if role:
            print(f"stream-rl {role}: {signal.Signals(signum).name} received: stopping", file=sys.stderr, flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    if role:
        signal.signal(signal.SIGINT, handler)


def start_role(args: list[str], log_path: Path, cpus: list[int] | None = None, cwd: str | None = None,
               env: dict[str, str] | None = None) -> tuple[subprocess.Popen, object]:
    """`python <args>` in a session of its own, output to `log_path`, on
    `cpus` (with its children) when given, with `env` added to this
    process's environment; returns the process and the open log."""
    log = open(log_path, "ab")
    parent = os.getpid()

    def setup() -> None:
        _exit_with_parent(parent)
        if cpus:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=setup, cwd=cwd, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    return proc, log


# A traceback's last line: `package.module.SomeError: why` (a CamelCase name).
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z][a-z]\w*: .+$")


def exit_cause(log_path: Path, tail_bytes: int = 65536) -> str | None:
    """The last exception line of a role's log (`SomeError: why`), or its
    last line; None for an empty log. A role that died in a loop of the same
    failure says it once here."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
    return (errors or lines or [None])[-1]


def died(role: str, proc: subprocess.Popen, log_path: Path) -> str:
    """What to say when a role's process has exited: killed by a signal
    (its log's last line says nothing then), or its log's last error."""
    code = proc.returncode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{role} process was killed by {name} (exit code {code}; log: {log_path})"
    cause = exit_cause(log_path)
    return f"{role} process exited with code {code}" + (f": {cause}" if cause else "") + f" (log: {log_path})"


def stop_role(proc: subprocess.Popen, ask: Callable[[], None], timeout_s: float) -> None:
    """`ask` it to exit; past `timeout_s`, kill it. Then kill whatever of its
    session is left (an engine's own processes, torchrun's ranks), also when
    the role itself is already gone: a generator killed mid-run left its vLLM
    engine running, holding memory, ports and, on a GPU host, the GPU."""
    stop_roles([(proc, ask, timeout_s)])


def stop_roles(roles: list[tuple[subprocess.Popen, Callable[[], None], float]]) -> None:
    """`stop_role` for several at once: all are asked together and waited
    for side by side (each up to its own timeout), so a job's stop takes its
    slowest role's time, not the sum."""
    start = time.monotonic()
    for proc, ask, _ in roles:
        if proc.poll() is None:
            try:
                ask()
            except Exception:
                pass
    for proc, _, timeout_s in sorted(roles, key=lambda r: r[2]):
        try:
            proc.wait(max(0.0, start + timeout_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            # The session's id is the role's pid; the kernel does not reuse it
            # while any process of the session lives.
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing of it is left
        proc.wait()
