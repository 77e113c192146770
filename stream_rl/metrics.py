"""Per-step metrics: JSONL on disk, TensorBoard scalars, Weights & Biases
(`run.wandb_project`, metrics_wandb), progress on screen."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from stream_rl.config import Config
from stream_rl.metrics_wandb import WandbRun

_SHOWN = (("reward_policy_mean", "reward {:.3f}"), ("prune/keep_rate", "keep {:.2f}"),
          ("gen_tokens_per_s", "{:.0f} tok/s"), ("version_lag_max", "lag {}"), ("policy_version", "v{}"),
          ("step_s", "{:.1f}s/step"))


class MetricsLogger:
    def __init__(self, out_dir: Path, total_steps: int, show_progress: bool = True, cfg: Config | None = None,
                 resumed: bool = False):
        # First: a W&B run that cannot start stops the job before anything is opened.
        self._wandb = WandbRun(cfg, out_dir, resumed) if cfg is not None and cfg.run.wandb_project else None
        self.path = out_dir / "metrics.jsonl"
        self._f = self.path.open("a")
        self.total = total_steps
        self.t0 = time.time()
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # tensorboard is optional; the JSONL is the record
            self._tb = None
        self._progress = None
        if show_progress and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                      TextColumn("{task.description}"), TimeElapsedColumn())
            self._task = self._progress.add_task("starting", total=total_steps)
            self._progress.start()

    def log(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])
        if self._wandb is not None:
            self._wandb.log(record)
        line = "  ".join(fmt.format(record[k]) for k, fmt in _SHOWN if k in record)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], description=line)
        else:
            print(f"step {record['step']}/{self.total}  {line}", flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def mean(xs) -> float:
    """The mean, 0 for none."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def summarize(records: list[dict]) -> dict:
    """Reward of the first and last 20% of steps, and run totals."""
    n = len(records)
    k = max(1, n // 5)
    first = mean(r["reward_policy_mean"] for r in records[:k])
    last = mean(r["reward_policy_mean"] for r in records[-k:])
    return {
        "steps": n,
        "policy_version": records[-1]["policy_version"] if records else 0,
        "reward_first_20pct": first,
        "reward_last_20pct": last,
        "reward_rise": last - first,
        "tokens_generated": sum(r["tokens_generated"] for r in records),
        "tokens_trained": sum(r["tokens_trained"] for r in records),
        "wall_s": records[-1]["wall_s"] if records else 0.0,
        # The run's mean generation rate: every generated token over the training wall time.
        "gen_tokens_per_s": (sum(r["tokens_generated"] for r in records) / records[-1]["wall_s"]
                             if records and records[-1]["wall_s"] else 0.0),
    }
