"""The held-out prompts: `eval` beside the training data, read and rendered as training reads them.

`stream-rl eval` scores its candidates on these rows. The held-out accuracy
of a model directory that `stream-rl bench e2e` and `pruning-bound` measure
reads the same rows from here: the tools import eval, not the reverse.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from stream_rl.config import Config
from stream_rl.data import PromptDataset


def default_heldout_path(cfg: Config) -> Path:
    """`eval` next to the training prompts, in their format (`eval.jsonl`
    beside `train.jsonl`, `eval.parquet` beside a parquet file; the tiny
    world's held-out split)."""
    path = Path(cfg.data.path)
    return path.with_name("eval" + (path.suffix or ".jsonl"))


def load_heldout(cfg: Config, tokenizer, path: str | Path | None = None, limit: int | None = None,
                 section: str = "data"):
    """The held-out rows (PromptRow: prompt text, reference, rendered ids) and their source.

    Read with the training data's field names and rendering: `data.prompt_field`,
    `data.answer_field`, `render_prompt` (chat template and system prompt
    included); `section` names the config section of the answer field in errors.
    """
    path = Path(path) if path is not None else default_heldout_path(cfg)
    data_cfg = msgspec.structs.replace(cfg.data, path=str(path), format="auto")
    ds = PromptDataset.load(data_cfg, tokenizer, section=section)
    rows = ds.rows if limit is None else ds.rows[:limit]
    return rows, ds
