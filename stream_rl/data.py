"""Prompt datasets: local JSONL, JSON, CSV or parquet files, or a `datasets` name.

Every row must carry the configured prompt and answer fields as non-empty
strings (numbers are accepted as answers); a bad row is an error naming the
file and line (or row, counted from 1), the field, and the config key that
names it. Prompts longer than `data.max_prompt_tokens` cannot be trained
on; they are set aside, counted and reported, never silently kept.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from stream_rl.config import DataConfig

log = logging.getLogger(__name__)

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class PromptRow:
    index: int
    prompt: str
    answer: str
    prompt_ids: tuple[int, ...]
    # Probability this prompt survived prompt-level pruning (DPPO).
    inclusion: float = 1.0


def _text(path: Path) -> str:
    """The file as UTF-8 text; bytes that are not UTF-8 are an error naming
    the file and line (counted from 1)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}; data files must be "
                        "UTF-8)") from None


def _json_lines(path: Path, text: str | None = None) -> list[tuple[str, object]]:
    rows = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 and its kin.
    for line_no, line in enumerate((_text(path) if text is None else text).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: not valid JSON ({err})") from None
    return rows


def _json(path: Path) -> list[tuple[str, object]]:
    """A JSON array of rows, or JSON lines under a .json name."""
    text = _text(path)
    if not text.lstrip().startswith("["):
        return _json_lines(path, text)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    return [(f"{path} row {i}", r) for i, r in enumerate(rows, 1)]


def _csv(path: Path) -> list[tuple[str, object]]:
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    # Line numbers count the header (line 1); a quoted field may span lines.
    return [(f"{path}:{reader.line_num}", row) for row in reader]


def _read_rows(cfg: DataConfig) -> tuple[list[tuple[str, object]], str]:
    """The rows, each with where it came from (file:line, or row N counted
    from 1), and the source's name."""
    path = Path(cfg.path)
    fmt = cfg.format
    if fmt == "auto":
        if path.suffix in SUFFIX_FORMATS:
            fmt = SUFFIX_FORMATS[path.suffix]
        elif path.is_file():
            raise DataError(f"data.path {path}: cannot tell the format from the suffix; set data.format "
                            f"({', '.join(sorted(set(SUFFIX_FORMATS.values())))})")
        else:
            fmt = "datasets"
    if fmt != "datasets" and not path.is_file():
        raise DataError(f"data.path {path} does not exist")
    if fmt in ("jsonl", "json", "csv"):
        return {"jsonl": _json_lines, "json": _json, "csv": _csv}[fmt](path), str(path)
    import datasets  # parquet and hub/local datasets both go through `datasets`

    if fmt == "parquet":
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    else:
        try:
            ds = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split)
        except Exception as err:
            raise DataError(f"data.path {cfg.path!r}: could not load it with datasets ({err})") from None
    return [(f"{cfg.path} row {i}", dict(r)) for i, r in enumerate(ds, 1)], cfg.path


def _field(row, name: str, where: str, config_key: str, number_ok: bool) -> str:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
    if name not in row:
        raise DataError(f"{where}: missing field '{name}' (set by {config_key}; the row has "
                        f"{', '.join(repr(k) for k in list(row)[:8])})")
    value = row[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and number_ok:
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{name}' (set by {config_key}) must be a non-empty string, got {value!r}")
    return value


def check_chat_template(cfg: DataConfig, tokenizer, model_key: str = "model.path") -> None:
    """data.apply_chat_template needs a tokenizer that has one."""
    if cfg.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.apply_chat_template is true, but the tokenizer of {model_key} has no chat template: "
                        "set data.apply_chat_template: false, or use a tokenizer that has one")


def render_prompt(cfg: DataConfig, tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids: the chat template's rendering (with
    data.system_prompt) or the plain tokenization."""
    if cfg.apply_chat_template:
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
        # Rendered as text, then tokenized without special tokens (the template
        # holds them): with tokenize=True, transformers 5 returns an encoding
        # object where 4.x returned the ids.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt, add_special_tokens=True).input_ids
    ids = list(ids)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise DataError(f"the tokenizer rendered a prompt as {ids[:4]}..., not token ids")
    return ids


@dataclass
class PromptDataset:
    rows: list[PromptRow]
    source: str
    overlong: list[int]  # indices of rows set aside as too long

    @classmethod
    def load(cls, cfg: DataConfig, tokenizer, section: str = "data") -> "PromptDataset":
        """`section`: the config section whose keys the errors name (eval
        reads its questions with eval.answer_field)."""
        check_chat_template(cfg, tokenizer)
        raw, source = _read_rows(cfg)
        rows, overlong = [], []
        for i, (where, row) in enumerate(raw):
            prompt = _field(row, cfg.prompt_field, where, "data.prompt_field", number_ok=False)
            answer = _field(row, cfg.answer_field, where, f"{section}.answer_field", number_ok=True)
            ids = render_prompt(cfg, tokenizer, prompt)
            if len(ids) > cfg.max_prompt_tokens:
                overlong.append(i)
                continue
            rows.append(PromptRow(i, prompt, answer, tuple(ids)))
        if overlong:
            log.warning("%s: %d of %d prompts exceed data.max_prompt_tokens=%d and are set aside (rows %s%s)",
                        source, len(overlong), len(raw), cfg.max_prompt_tokens, [i + 1 for i in overlong[:5]],
                        "..." if len(overlong) > 5 else "")
        if not rows:
            raise DataError(f"{source}: no usable prompts ({len(raw)} rows, {len(overlong)} longer than "
                            f"data.max_prompt_tokens={cfg.max_prompt_tokens})")
        return cls(rows, source, overlong)


class PromptSampler:
    """Endless epochs over the dataset, reshuffled each epoch (seeded)."""

    def __init__(self, dataset: PromptDataset, shuffle: bool, seed: int):
        self.rows = dataset.rows
        self.shuffle = shuffle
        self.rng = random.Random(seed)
        self.epoch = 0
        self._order: list[int] = []
        self._pos = 0

    def next(self) -> PromptRow:
        if self._pos >= len(self._order):
            self._order = list(range(len(self.rows)))
            if self.shuffle:
                self.rng.shuffle(self._order)
            self._pos = 0
            self.epoch += 1
        row = self.rows[self._order[self._pos]]
        self._pos += 1
        return row

    def state_dict(self) -> dict:
        """JSON-able position: epoch, order, place in it, RNG."""
        return {"epoch": self.epoch, "order": list(self._order), "pos": self._pos, "rng": _rng_state(self.rng),
                "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state["rows"] != len(self.rows):
            raise ValueError(f"sampler state is for {state['rows']} prompts; the dataset has {len(self.rows)}")
        self.epoch, self._order, self._pos = state["epoch"], list(state["order"]), state["pos"]
        _set_rng_state(self.rng, state["rng"])


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class DppoPromptSampler:
    """DPPO's prompt-level pruning in front of a `PromptSampler`.

    A prompt's history score is the mean |A| of its group when last trained
    (carried forward while it is skipped). From the second epoch, a prompt
    in the lowest half of the known scores is skipped with probability
    `rate`; one that passes that draw is returned with inclusion probability
    1 − rate, for the learner's Horvitz–Thompson weights.
    """

    def __init__(self, sampler: PromptSampler, rate: float, seed: int):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"data.dppo_prompt_rate must lie in [0, 1), got {rate}")
        self.sampler = sampler
        self.rate = rate
        self.rng = random.Random(seed ^ 0x5EED)
        self.history: dict[tuple[int, ...], float] = {}
        self.skipped = 0
        self._threshold: float | None = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def record(self, prompt_ids, score: float) -> None:
        """The mean |A| of a prompt's group in the latest update."""
        self.history[tuple(prompt_ids)] = float(score)
        self._threshold = None

    def _median(self) -> float | None:
        if self._threshold is None and self.history:
            self._threshold = statistics.median(self.history.values())
        return self._threshold

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "rng": _rng_state(self.rng), "skipped": self.skipped,
                "history": [[list(k), v] for k, v in self.history.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        _set_rng_state(self.rng, state["rng"])
        self.skipped = state["skipped"]
        self.history = {tuple(k): float(v) for k, v in state["history"]}
        self._threshold = None

    def next(self) -> PromptRow:
        while True:
            row = self.sampler.next()
            score = self.history.get(row.prompt_ids)
            at_risk = (self.rate > 0 and self.sampler.epoch > 1 and score is not None
                       and score < self._median())
            if not at_risk:
                return row
            if self.rng.random() >= self.rate:
                return replace(row, inclusion=1.0 - self.rate)
            self.skipped += 1
