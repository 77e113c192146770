"""`stream-rl train` as a subprocess, on ports of its own (the session's
shared generator may hold engine_cfg's), for tests that signal its roles."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import msgspec

from stream_rl.transport import free_ports
from tests.conftest import ROOT, cfg_with


def start_train(engine_cfg, tmp_path, steps: int, sets: tuple[str, ...] = (), env: dict | None = None,
                **overrides):
    """The job's config (ports of its own, `overrides` applied), its OUT, and
    its process (with `env` added to its environment)."""
    ports = free_ports(2 + 2 * overrides.get("generator__count", 1))
    cfg = cfg_with(engine_cfg, **overrides, generator__request_addr=f"tcp://127.0.0.1:{ports[2]}",
                   generator__stream_addr=f"tcp://127.0.0.1:{ports[3]}",
                   learner__addr=f"tcp://127.0.0.1:{ports[0]}", learner__reply_addr=f"tcp://127.0.0.1:{ports[1]}")
    cfg_path = tmp_path / "job.json"
    cfg_path.write_bytes(msgspec.json.encode(cfg))
    out = tmp_path / "run"
    args = [a for s in sets for a in ("--set", s)]
    job = subprocess.Popen([sys.executable, "-m", "stream_rl", "train", "--config", str(cfg_path), "--out", str(out),
                            "--max-steps", str(steps), *args], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return cfg, out, job


def records(out) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def wait_steps(job, out, n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while len(records(out)) < n:
        assert job.poll() is None, job.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"the job made no {n} steps in {timeout_s:.0f} s"
        time.sleep(0.2)


def finish(job, timeout_s: float) -> str:
    """Its output once it exits."""
    return job.communicate(timeout=timeout_s)[0]


@contextlib.contextmanager
def running(job):
    """The test's time with the job: killed (with its roles, by their
    parent-death signal) if the test ends before it does."""
    try:
        yield job
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
