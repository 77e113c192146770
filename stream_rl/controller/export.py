"""Every trained batch as Parquet (`run.export_rollouts`, `stream-rl train
--export-rollouts DIR`): the rollouts the learner was sent, each with the
policy version of every token, its sampled log-probs and the probability it
survived pruning, so an offline or off-policy method (or an audit of what a
run trained on) can reuse them without rerunning the engines.

One row per trained rollout (a group's survivors: a pruned member completes
its group but is no policy sample), with `group_size` the group's members
before pruning: the N of a Horvitz–Thompson estimate over the survivors
weighted by 1 / `inclusion`.

Streamed: each step is one complete file, `DIR/step_000001.parquet`, built
with an explicit schema (the dtypes never depend on the values seen),
written under a temporary name and renamed into place, so a reader or a
crash never sees half a file; nothing is kept between steps. A resumed job
deletes the killed run's files past its checkpoint's step (as `Job.restore`
truncates metrics.jsonl) and a fresh one those from its first step on, so
each step is in the directory once, as trained by this run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stream_rl.protocol import Group

SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("group_id", pa.string()),
    ("rollout_id", pa.string()),
    ("group_size", pa.int32()),  # members before pruning
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),  # null: the engine was not asked for them
    ("versions", pa.list_(pa.int32())),  # the policy version that sampled each token
    ("reward", pa.float64()),
    ("inclusion", pa.float64()),  # keep_prob x prompt_inclusion: the probability it survived pruning
    ("finish_reason", pa.string()),
])

_NAME = re.compile(r"^step_(\d+)\.parquet$")
_TMP = re.compile(r"^\.step_\d+\.parquet\.tmp$")


def file_name(step: int) -> str:
    return f"step_{step:06d}.parquet"


def batch_table(step: int, groups: list[Group]) -> pa.Table:
    """One row per survivor of `groups`, typed by SCHEMA."""
    rows = [(g, r) for g in groups for r in g.survivors]
    return pa.Table.from_arrays([
        pa.array([step] * len(rows), pa.int64()),
        pa.array([r.group_id for _, r in rows], pa.string()),
        pa.array([r.rollout_id for _, r in rows], pa.string()),
        pa.array([len(g.rollouts) for g, _ in rows], pa.int32()),
        pa.array([r.prompt_ids for _, r in rows], pa.list_(pa.int32())),
        pa.array([r.response_ids for _, r in rows], pa.list_(pa.int32())),
        pa.array([r.logprobs for _, r in rows], pa.list_(pa.float32())),
        pa.array([r.versions for _, r in rows], pa.list_(pa.int32())),
        pa.array([r.reward for _, r in rows], pa.float64()),
        pa.array([r.keep_prob * r.prompt_inclusion for _, r in rows], pa.float64()),
        pa.array([r.finish_reason for _, r in rows], pa.string()),
    ], schema=SCHEMA)


class RolloutExport:
    """Writes each trained batch to `dir` as one Parquet file per step."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started = False

    def steps(self) -> list[int]:
        """The steps with a file in the directory, in order."""
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name)))

    def write(self, step: int, groups: list[Group]) -> Path:
        """`step`'s batch as DIR/step_NNNNNN.parquet, whole or not at all.
        The first write of a job first deletes the files of this step and
        later ones an earlier job left (a resumed job's were already, at
        `drop_after`)."""
        if not self.started:
            self.drop_after(step - 1)
            self.started = True
        path = self.dir / file_name(step)
        tmp = self.dir / f".{path.name}.tmp"  # hidden: readers globbing *.parquet skip it
        with open(tmp, "wb") as f:
            pq.write_table(batch_table(step, groups), f)
            f.flush()
            os.fsync(f.fileno())  # the rename never points at data still unwritten after a power loss
        os.replace(tmp, path)
        return path

    def drop_after(self, step: int) -> None:
        """Delete the files of steps after `step` (a killed run's, redone
        after its checkpoint) and any temporary file a crash left."""
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if (m and int(m.group(1)) > step) or _TMP.match(p.name):
                p.unlink(missing_ok=True)
