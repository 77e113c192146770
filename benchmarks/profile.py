"""`stream-rl bench profile`: where each role's CPU goes per 1k generated tokens (#24).

Runs `stream-rl train` on the config as a child, and over a window of its
steps (after `skip` warm-up steps, before the last one) reads every process
of the job's tree: the controller (the train process), the generator's front
end, the learner, the engine's own processes (vLLM's engine core and
workers), and anything else. Each role's CPU seconds over the window, per 1k
tokens generated in it, and its share of a core. With py-spy installed
(`pip install py-spy`), each Python process is also sampled over the same
window and its hottest functions are listed by self time, in µs per
generated token: the "which function, how many µs per token" a limit needs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from stream_rl.generator.step_trace import ENV as STEP_TRACE_ENV
from stream_rl.generator.step_trace import summarize as summarize_steps
from stream_rl.metrics import read_metrics

ROLES = ("controller", "generator_front", "engine", "learner", "other")


def role_of(proc, root_pid: int) -> str:
    """The role of one process of the job's tree, from its command line and parent."""
    import psutil

    try:
        cmd = " ".join(proc.cmdline())
        if proc.pid == root_pid:
            return "controller"
        if "stream_rl" in cmd and " generator" in cmd:
            return "generator_front"
        if "stream_rl" in cmd and " learner" in cmd:
            return "learner"
        parent = proc.parent()
        while parent is not None and parent.pid != root_pid:
            pcmd = " ".join(parent.cmdline())
            if "stream_rl" in pcmd and " generator" in pcmd:
                return "engine"  # vLLM's engine core, its workers and helpers
            parent = parent.parent()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return "other"


def cpu_by_pid(root) -> dict[int, tuple[str, float]]:
    import psutil

    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (role_of(p, root.pid), t.user + t.system)
        except psutil.NoSuchProcess:
            pass
    return out


def top_functions(raw: str, rate: int, tokens: int, n: int = 12) -> list[dict]:
    """py-spy's raw (collapsed) stacks -> the `n` functions with the most
    self time, in µs per generated token and as a share of the samples."""
    self_samples: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if frames:
            self_samples[frames[-1]] += int(count)
            total += int(count)
    return [{"function": f, "us_per_token": 1e6 * c / rate / tokens if tokens else None,
             "share": c / total} for f, c in self_samples.most_common(n)]


def engine_steps(summary: dict, generated: int) -> dict:
    """The trace's summary, with each part of the engine's time priced per
    1k generated tokens: forward steps (of which prefill tokens, at the
    fitted cost per token), weight loads, and the rest (scheduling,
    sampling, messages, waiting for work)."""
    out = dict(summary)
    if not generated or not summary["window_s"]:
        return out
    per_1k = 1000.0 / generated
    rest = summary["window_s"] - summary["forward_s"] - summary["weight_load_s"]
    out["ms_per_1k_generated"] = {
        "wall": 1000 * summary["window_s"] * per_1k,
        "forward": 1000 * summary["forward_s"] * per_1k,
        "forward_fixed": (1000 * summary["step_fixed_s"] * summary["steps"] * per_1k
                          if summary["step_fixed_s"] is not None else None),
        "prefill": (1000 * summary["step_per_token_s"] * summary["prefill_tokens"] * per_1k
                    if summary["step_per_token_s"] is not None else None),
        "weight_load": 1000 * summary["weight_load_s"] * per_1k,
        "rest": 1000 * rest * per_1k,
    }
    return out


def _records(path: Path) -> list[dict]:
    """The run's metrics so far; none while a line is half written (the caller polls again)."""
    try:
        return read_metrics(path) if path.is_file() else []
    except json.JSONDecodeError:
        return []


def profile(config: str, overrides: list[str], steps: int, skip: int = 5, rate: int = 100,
            workdir: str | None = None, timeout_s: float = 1800.0) -> dict:
    import psutil

    from benchmarks.common import BenchSetupError

    if steps < skip + 3:
        raise BenchSetupError(f"--steps ({steps}) must leave at least 3 steps after the {skip} warm-up steps")
    # On PATH, or beside this interpreter (a virtual environment not activated).
    pyspy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-profile-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "stream_rl", "train", "--config", config, "--out", str(out),
               "--max-steps", str(steps), "--set", "run.progress=false"]
        for o in overrides:
            cmd += ["--set", o]
        trace = Path(tmp) / "steps"  # the engine's own account of its steps (generator/step_trace.py)
        proc = subprocess.Popen(cmd, stdout=open(Path(tmp) / "train.log", "wb"), stderr=subprocess.STDOUT,
                                env={**os.environ, STEP_TRACE_ENV: str(trace)})
        root = psutil.Process(proc.pid)
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + timeout_s

        def wait_for(n: int) -> list[dict]:
            while len(recs := _records(metrics)) < n:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log = (Path(tmp) / "train.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the profiled run ended or stalled before step {n}:\n{log}")
                time.sleep(0.05)
            return recs

        try:
            n0 = len(wait_for(skip))
            cpu0, t0, m0 = cpu_by_pid(root), time.perf_counter(), time.monotonic()
            spies = {}
            if pyspy:
                for pid, (role, _) in cpu0.items():
                    if role != "other":
                        f = Path(tmp) / f"{role}-{pid}.txt"
                        spies[pid] = (role, f, subprocess.Popen(
                            [pyspy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                             "--output", str(f), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            n1 = len(wait_for(steps - 1))
            cpu1, t1, m1 = cpu_by_pid(root), time.perf_counter(), time.monotonic()
            for _, _, spy in spies.values():
                spy.send_signal(signal.SIGINT)
            for _, _, spy in spies.values():
                spy.wait(60)
            recs = wait_for(n1)[n0:n1]
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.terminate()  # its roles exit with it
                proc.wait(60)
        window = t1 - t0
        tokens = sum(r["tokens_generated"] for r in recs)
        cpu = {r: 0.0 for r in ROLES}
        for pid, (role, c) in cpu1.items():
            cpu[role] += c - cpu0.get(pid, (role, 0.0))[1]
        result = {
            "benchmark": "profile", "config": config, "overrides": overrides, "steps_in_window": len(recs),
            "window_s": window, "generated_tokens": tokens, "gen_tokens_per_s": tokens / window if window else 0.0,
            "cpus": os.cpu_count(), "py_spy": bool(pyspy), "rate_hz": rate,
            "roles": {r: {"cpu_s": c, "cpu_s_per_1k_tokens": 1000 * c / tokens if tokens else None,
                          "cores": c / window if window else None} for r, c in cpu.items()},
        }
        result["engine_steps"] = engine_steps(summarize_steps(trace, m0, m1), tokens)
        for pid, (role, f, _) in spies.items():
            if f.is_file():
                fn = result["roles"][role].setdefault("top_self", [])
                fn += top_functions(f.read_text(), rate, tokens)
        return result


def main(config: str, overrides: list[str], out_json: str | None, steps: int) -> dict:
    from benchmarks.common import emit

    return emit(profile(config, overrides, steps), out_json)
