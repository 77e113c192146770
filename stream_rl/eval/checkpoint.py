"""What `stream-rl eval --checkpoint` accepts, and where its parts are.

- A run directory OUT: its newest complete job checkpoint (below).
- A learner checkpoint (`OUT/checkpoint`, written by `save_checkpoint`):
  `meta.json`, the policy in `model/model.safetensors` (no tokenizer) and,
  with ARRoL, `head.pt` whose "head" is the quality head's state dict.
- A model directory: `OUT/final_model` (config, weights, tokenizer and, with
  ARRoL, `quality_head.pt`: "head" as in head.pt, and "l_detect") or any
  Hugging Face model directory (no head: the quality-head vote is skipped).

The run's own config (`OUT/config.json`, beside either) is found too: it is
the config the head was trained under (its L_detect, model, data fields).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stream_rl.learner.checkpoint import FINAL_HEAD_FILE, HEAD_FILE, MODEL_FILE
from stream_rl.pruner.head import HEAD_PREFIX

# The quality head beside a final model: {"head": state dict, "l_detect": int}
# (a .pt file: vLLM loads every *.safetensors of a model directory as weights).


class CheckpointError(ValueError):
    """The path is not a checkpoint or model directory eval can read."""


@dataclass
class PolicySource:
    path: Path
    kind: str  # "checkpoint" or "model"
    # kind "model": the directory the engine is built from. kind
    # "checkpoint": None, the engine is built from the config's model.path
    # (the tokenizer's home) and `weights_file` is loaded into it in place.
    model_dir: Path | None
    weights_file: Path | None
    # `quality_head.*` tensors, or None when the source has no head.
    head: dict[str, torch.Tensor] | None
    # The L_detect stored with the head (final_model), if any.
    head_l_detect: int | None
    # The run's config.json beside the source, if there is one.
    run_config: Path | None


def _stream_rl_config(cand: Path) -> Path | None:
    """`cand` if it is a stream_rl config (a Hugging Face config.json is not)."""
    try:
        raw = json.loads(cand.read_text())
    except (OSError, ValueError):
        return None
    return cand if isinstance(raw, dict) and isinstance(raw.get("model"), dict) else None


def _run_config(path: Path) -> Path | None:
    """The run's config.json beside a checkpoint or final model."""
    return _stream_rl_config(path.parent / "config.json")


def _read_head(file: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    saved = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "head" not in saved:
        raise CheckpointError(f"{file} holds no quality head (no 'head' key)")
    head = {HEAD_PREFIX + k: v for k, v in saved["head"].items()}
    if f"{HEAD_PREFIX}net.0.weight" not in head:
        raise CheckpointError(f"{file}: the quality head lacks net.0.weight; got {sorted(saved['head'])}")
    l_detect = saved.get("l_detect")
    return head, int(l_detect) if l_detect is not None else None


def resolve_checkpoint(path: str | Path) -> PolicySource:
    """Read what `path` holds; a CheckpointError says what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {path}: not a directory")
    if not (path / "meta.json").is_file() and _stream_rl_config(path / "config.json"):
        # A run directory (OUT): its newest complete job checkpoint.
        from stream_rl.learner.checkpoint import find_checkpoint

        try:
            return resolve_checkpoint(find_checkpoint(path / "checkpoint"))
        except FileNotFoundError as err:
            raise CheckpointError(f"--checkpoint {path} is a run directory without a checkpoint: {err}") from None
    if (path / "meta.json").is_file():
        weights = path / MODEL_FILE
        if not weights.is_file():
            raise CheckpointError(f"checkpoint {path} has no {MODEL_FILE}")
        has_head = json.loads((path / "meta.json").read_text()).get("has_head", False)
        if has_head and not (path / HEAD_FILE).is_file():
            raise CheckpointError(f"checkpoint {path} says it has a quality head, but {HEAD_FILE} is missing")
        head, l_detect = _read_head(path / HEAD_FILE) if has_head else (None, None)
        return PolicySource(path, "checkpoint", None, weights, head, l_detect, _run_config(path))
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        head, l_detect = _read_head(path / FINAL_HEAD_FILE) if (path / FINAL_HEAD_FILE).is_file() else (None, None)
        return PolicySource(path, "model", path, None, head, l_detect, _run_config(path))
    raise CheckpointError(f"--checkpoint {path}: neither a learner checkpoint (meta.json, {MODEL_FILE}) "
                          "nor a model directory (config.json, *.safetensors)")


def check_fits(source: PolicySource, model_config) -> None:
    """A learner checkpoint's weights go into the config's model.path model:
    its meta.json must describe that model (else the engine refuses the
    weights only after it has loaded)."""
    if source.kind != "checkpoint":
        return
    saved = json.loads((source.path / "meta.json").read_text()).get("model") or {}
    here = {k: getattr(model_config, k, None) for k in saved}
    differ = {k: (v, here[k]) for k, v in saved.items() if v is not None and here[k] is not None and v != here[k]}
    if differ:
        diff = ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differ.items())
        raise CheckpointError(f"checkpoint {source.path} was trained on another model than model.path's ({diff}): "
                              "evaluate with the run's own config (leave out --config: OUT/config.json) or set "
                              "model.path to the model it was trained from")


def default_config(checkpoint: str | Path) -> Path:
    """The run's config.json beside `checkpoint` (what `--config` defaults to)."""
    found = resolve_checkpoint(checkpoint).run_config
    if found is None:
        raise CheckpointError(f"no run config.json beside {checkpoint}: pass --config")
    return found
