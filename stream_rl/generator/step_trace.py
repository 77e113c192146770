"""A trace of the engine's own work, step by step, for `bench profile` (#24).

A CPU engine's process is busy nearly all the time, so its CPU seconds do
not say what it spent them on. With `STREAM_RL_STEP_TRACE=DIR` in the
generator's environment, each worker appends one line per model forward
to `DIR/steps-<pid>.txt`:

    S <start> <seconds> <tokens> <requests>

(`tokens` the batch's scheduled tokens, `requests` its rows: tokens beyond
one per row are prefill: new prompts, continuations, KV recomputed after a
weight load), one per weight load into the model, `W <start> <seconds>`,
and one per weight transfer received in the background (torch_dist),
`R <start> <seconds>`. Times are `time.monotonic()`, which every process on
the host shares. Off, nothing is hooked and nothing runs.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

ENV = "STREAM_RL_STEP_TRACE"


class StepTrace:
    """Forward hooks on the worker's model that time each step."""

    def __init__(self, runner, directory: str, flush_every: int = 256):
        self.runner = runner
        self.path = Path(directory) / f"steps-{os.getpid()}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lines: list[str] = []
        self._lock = threading.Lock()  # weight transfers are received in a thread of their own
        self._flush_every = flush_every
        self._start: float | None = None
        self._shape = (0, 0)
        model = runner.get_model()
        self._handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after)]

    def _before(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = int(ids.shape[0]) if ids is not None else 0
        self._shape = (tokens, int(self.runner.input_batch.num_reqs))
        self._start = time.monotonic()
        return None

    def _after(self, module, args, output):
        if self._start is None:
            return None
        end = time.monotonic()
        tokens, reqs = self._shape
        if reqs:  # not a profiling or warm-up run
            with self._lock:
                self._lines.append(f"S {self._start:.6f} {end - self._start:.6f} {tokens} {reqs}\n")
        self._start = None
        if len(self._lines) >= self._flush_every:
            self.flush()
        return None

    def event(self, kind: str, start: float, end: float) -> None:
        """A weight load ("W") or transfer ("R") from `start` to `end`."""
        with self._lock:
            self._lines.append(f"{kind} {start:.6f} {end - start:.6f}\n")
        self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._lines:
                with open(self.path, "a") as f:
                    f.writelines(self._lines)
                self._lines.clear()

    def close(self) -> None:
        self.flush()
        for h in self._handles:
            h.remove()


def read_trace(directory: str | Path) -> tuple[list[tuple[float, float, int, int]], list[tuple[str, float, float]]]:
    """Every trace file in `directory`: the steps as (start, seconds, tokens,
    rows) and the weight loads and transfers as (kind, start, seconds), in
    time order."""
    steps, events = [], []
    for f in sorted(Path(directory).glob("steps-*.txt")):
        for line in f.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5 and parts[0] == "S":
                steps.append((float(parts[1]), float(parts[2]), int(parts[3]), int(parts[4])))
            elif len(parts) == 3 and parts[0] in ("W", "R"):
                events.append((parts[0], float(parts[1]), float(parts[2])))
    return sorted(steps), sorted(events, key=lambda e: e[1])


def summarize(directory: str | Path, start: float, end: float) -> dict:
    """The engine's work between monotonic times `start` and `end`: forward
    steps, their seconds, rows and prefill tokens, weight loads, and a
    least-squares fit of a step's seconds as `fixed + per_token x tokens`,
    which prices each part."""
    all_steps, events = read_trace(directory)
    steps = [s for s in all_steps if start <= s[0] < end]
    loads = [e[2] for e in events if e[0] == "W" and start <= e[1] < end]
    transfers = [e[2] for e in events if e[0] == "R" and start <= e[1] < end]
    window = end - start
    n = len(steps)
    forward_s = sum(s[1] for s in steps)
    tokens = sum(s[2] for s in steps)
    rows = sum(s[3] for s in steps)
    fixed = per_token = None
    if n >= 2:
        mean_t, mean_s = tokens / n, forward_s / n
        var = sum((s[2] - mean_t) ** 2 for s in steps)
        if var > 0:
            per_token = sum((s[2] - mean_t) * (s[1] - mean_s) for s in steps) / var
            fixed = mean_s - per_token * mean_t
    return {
        "window_s": window, "steps": n, "forward_s": forward_s,
        "forward_share": forward_s / window if window else None,
        "weight_loads": len(loads), "weight_load_s": sum(loads), "weight_transfer_s": sum(transfers),
        "scheduled_tokens": tokens, "rows": rows, "prefill_tokens": tokens - rows,
        "mean_rows_per_step": rows / n if n else None,
        "step_fixed_s": fixed, "step_per_token_s": per_token,
    }
