"""Learner (and pruner) checkpoints that resume a run exactly.

A checkpoint is a directory:

  model/model.safetensors, model/config.json   policy weights (a tied weight
                                               once), loadable by Hugging Face
  optimizer.pt                                 AdamW state
  trainer.pt                                   learner.steps, its python RNG,
                                               torch's RNG(s), step, version, extra
  head.pt                                      ARRoL's quality head, its Adam state,
                                               replay ring and torch Generator
  pruner.json                                  the pruner's `state_dict()`
  meta.json                                    step, version, config hash (written last)

It is written to `<path>.tmp` and renamed into place, so a crash leaves the
previous checkpoint (or none), never half of one. Every rank holds the same
state, so rank 0 saves and every rank loads. The reference model (KL) is the
initial policy and is rebuilt from `model.path`, not saved. `extra` must be
plain data (it is loaded with `weights_only=True`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from pathlib import Path

import msgspec
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT = 1
MODEL_FILE = Path("model") / "model.safetensors"
HEAD_FILE = "head.pt"  # the quality head's weights, optimizer and replay
# The quality head beside a saved policy (final_model/), for `stream-rl eval`.
FINAL_HEAD_FILE = "quality_head.pt"


def config_hash(cfg) -> str:
    """The config's identity, its run id aside (a new one every run)."""
    cfg = msgspec.structs.replace(cfg, run=msgspec.structs.replace(cfg.run, id=""))
    return hashlib.sha256(msgspec.json.encode(cfg)).hexdigest()[:16]


def _unique_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict with each tied tensor once (first name kept:
    embed_tokens before lm_head, as `save_pretrained` does)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v.detach().contiguous().cpu()
    return out


def _rng_state() -> dict:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path, learner, *, step: int, version: int, pruner=None, extra: dict | None = None) -> Path:
    """Write the learner's (and `pruner`'s) full state to the directory `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / MODEL_FILE.parent).mkdir(parents=True)
    save_file(_unique_state(learner.model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    learner.model.config.save_pretrained(tmp / MODEL_FILE.parent)
    torch.save(learner.opt.state_dict(), tmp / "optimizer.pt")
    torch.save({"steps": learner.steps, "py_rng": learner.rng.getstate(), "rng": _rng_state(),
                "step": step, "version": version, "extra": extra or {}}, tmp / "trainer.pt")
    ht = learner.head_trainer
    if ht is not None:
        torch.save(ht.state_dict(), tmp / HEAD_FILE)
    if pruner is not None:
        _write_json(tmp / "pruner.json", pruner.state_dict())
    mc = learner.model.config
    _write_json(tmp / "meta.json", {
        "format": FORMAT, "step": step, "version": version, "config_hash": config_hash(learner.cfg),
        "learner_steps": learner.steps, "has_head": ht is not None, "has_pruner": pruner is not None,
        "model": {k: getattr(mc, k, None) for k in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")},
    })
    # The job's checkpoint keeps two generations (`Job.checkpoint`); this
    # part, written into its staging directory, replaces what is there.
    return commit_checkpoint(tmp, path, keep_previous=False)


def save_own_learner_part(path, cfg, *, step: int, version: int, has_head: bool) -> None:
    """The learner's part of a job checkpoint when the learner is one of
    your own (`RolloutSource`): its `meta.json` (the quality head, if any,
    beside it); your learner's state is wherever `on_checkpoint` put it."""
    _write_json(Path(path) / "meta.json", {"format": FORMAT, "learner": "own", "step": step, "version": version,
                                           "config_hash": config_hash(cfg), "has_head": has_head})


# --- the whole job's checkpoint: the learner's part, then the controller's ----------

CONTROLLER_FILE = "controller.json"  # written last: a checkpoint is complete when it is there


def staging_path(path) -> Path:
    """Where the next checkpoint is assembled before it replaces `path`."""
    path = Path(path)
    return path.with_name(path.name + ".next")


def save_controller_state(path, *, pruner, buffer, state: dict) -> None:
    """Add the controller's part to the learner's checkpoint at `path`: the
    pruner, the recycling buffer (partials included), then `state` (step,
    version, the prompt sampler's position)."""
    path = Path(path)
    _write_json(path / "pruner.json", pruner.state_dict())
    buffer.save(path / "buffer.msgpack")
    tmp = path / (CONTROLLER_FILE + ".tmp")
    _write_json(tmp, state)
    os.replace(tmp, path / CONTROLLER_FILE)


def _fsync_tree(root: Path) -> None:
    """Every file under `root`, then every directory, on disk: a rename is
    atomic, but after a power loss it may point at files never written."""
    dirs = [root]
    for p in root.rglob("*"):
        if p.is_dir():
            dirs.append(p)
            continue
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    for d in dirs:
        _fsync_dir(d)


MANIFEST_FILE = "manifest.json"  # every file's size and CRC-32, written at commit


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def check_checkpoint(path) -> str | None:
    """What is wrong with the checkpoint at `path` (missing, incomplete, a
    file truncated or changed since it was committed), or None if intact."""
    path = Path(path)
    if not path.is_dir():
        return "not there"
    for name in (CONTROLLER_FILE, "meta.json"):
        if not (path / name).is_file():
            return f"incomplete: no {name}"
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return None  # written before manifests: trusted as complete
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"{MANIFEST_FILE} is unreadable ({type(err).__name__}: {err})"
    for rel, (size, crc) in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} is {f.stat().st_size} bytes, {size} when it was written (truncated?)"
        if _crc32(f) != crc:
            return f"{rel} does not match its CRC-32 (changed or corrupted since it was written)"
    return None


# The checkpoints kept: the newest (`path`) and the one before (`path`.prev),
# so a newer one found damaged at resume still leaves one to resume from.
def previous_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def commit_checkpoint(staged, path, keep_previous: bool = True) -> Path:
    """Swap the complete checkpoint at `staged` in as `path`, with a manifest
    of its files, all fsynced; the one it replaces becomes `path`.prev (the
    one before that is deleted), or goes too without `keep_previous`. A
    crash at any point leaves the newest complete one findable
    (`find_checkpoint`)."""
    staged, path = Path(staged), Path(path)
    _write_json(staged / MANIFEST_FILE, {"files": {str(f.relative_to(staged)): [f.stat().st_size, _crc32(f)]
                                                   for f in _files(staged)}})
    _fsync_tree(staged)
    prev = previous_path(path)
    if path.exists():
        shutil.rmtree(prev, ignore_errors=True)
        path.rename(prev)
    staged.rename(path)
    if not keep_previous:
        shutil.rmtree(prev, ignore_errors=True)
    _fsync_dir(path.parent)  # the renames themselves
    return path


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(path) -> Path:
    """The newest intact job checkpoint at `path`: a run killed while
    writing or swapping one leaves it as `path`.next; a damaged newest one
    is passed over for `path`.prev, saying what is wrong with it."""
    path = Path(path)
    problems = []
    for cand in (staging_path(path), path, previous_path(path), path.with_name(path.name + ".old")):
        why = check_checkpoint(cand)
        if why is None:
            for older, reason in problems:
                if reason != "not there" and not (older == staging_path(path) and reason.startswith("incomplete")):
                    log.warning("checkpoint %s is not used: %s; resuming from %s", older, reason, cand)
            return cand
        problems.append((cand, why))
    raise FileNotFoundError(f"no intact checkpoint at {path}: "
                            + "; ".join(f"{c.name}: {why}" for c, why in problems if why != "not there")
                            if any(why != "not there" for _, why in problems)
                            else f"no complete checkpoint at {path} (nor {path.name}.next / {path.name}.prev)")


def load_controller_state(path, *, pruner, buffer, sampler) -> dict:
    """Restore what `save_controller_state` wrote; returns its `state`."""
    path = Path(path)
    state = json.loads((path / CONTROLLER_FILE).read_text())
    pstate = json.loads((path / "pruner.json").read_text())
    if pstate.get("kind") != type(pruner).__name__:
        raise ValueError(f"checkpoint {path} holds a {pstate.get('kind')}'s state; the pruner is a "
                         f"{type(pruner).__name__} (pruner.mode)")
    sampler.load_state_dict(state["sampler"])
    pruner.load_state_dict(pstate)
    buffer.load(path / "buffer.msgpack")
    return state


def _check_model(path: Path, model, meta: dict) -> None:
    """Every model tensor is in the file (or tied to one that is), with the
    same shape; else a ValueError saying how the models differ."""
    with safe_open(str(path / MODEL_FILE), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = model.state_dict()
    ptr = {(v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)): k for k, v in state.items()
           if k in saved}
    problems = [f"{k}: checkpoint {saved[k]}, model {tuple(v.shape)}" for k, v in state.items()
                if k in saved and saved[k] != tuple(v.shape)]
    problems += [f"{k}: not in the checkpoint" for k, v in state.items() if k not in saved
                 and (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) not in ptr]
    problems += [f"{k}: in the checkpoint, not in the model" for k in saved if k not in state]
    if problems:
        mc = model.config
        here = {k: getattr(mc, k, None) for k in meta.get("model", {})}
        raise ValueError(f"checkpoint {path} does not fit this model (checkpoint {meta.get('model')}, model {here}): "
                         + "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))


def load_checkpoint(path, learner, pruner=None) -> dict:
    """Restore what `save_checkpoint` wrote into `learner` (and `pruner`);
    returns {step, version, extra, config_changed}."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {meta.get('format')}; this code reads {FORMAT}")
    if meta.get("learner") == "own":
        raise ValueError(f"checkpoint {path} was written with a learner of your own (RolloutSource): it holds no "
                         "policy; resume it with RolloutSource(..., resume=True)")
    ht = learner.head_trainer
    if meta["has_head"] != (ht is not None):
        raise ValueError(f"checkpoint {path} {'has' if meta['has_head'] else 'has no'} quality head; the learner "
                         f"{'has' if ht is not None else 'has no'} one (pruner.mode)")
    if pruner is not None and not (path / "pruner.json").exists():
        raise ValueError(f"checkpoint {path} holds no pruner state")
    # Everything is read and checked before anything is changed.
    _check_model(path, learner.model, meta)
    weights = load_file(str(path / MODEL_FILE))
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    tr = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    h = torch.load(path / HEAD_FILE, map_location="cpu", weights_only=True) if ht is not None else None
    if h is not None:
        ht.check_state(h, path)
    pstate = json.loads((path / "pruner.json").read_text()) if pruner is not None else None
    if pstate is not None and pstate.get("kind") != type(pruner).__name__:
        raise ValueError(f"checkpoint {path} holds a {pstate.get('kind')}'s state; the pruner is a "
                         f"{type(pruner).__name__} (pruner.mode)")

    with torch.no_grad():
        learner.model.load_state_dict(weights, strict=False)  # a tied tensor comes with its twin
    learner.opt.load_state_dict(opt)
    learner.steps = tr["steps"]
    learner.rng.setstate(tr["py_rng"])
    torch.set_rng_state(tr["rng"]["torch"])
    if "cuda" in tr["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tr["rng"]["cuda"])
    if h is not None:
        ht.load_state_dict(h)
    if pstate is not None:
        pruner.load_state_dict(pstate)
    return {"step": tr["step"], "version": tr["version"], "extra": tr["extra"],
            "config_changed": meta["config_hash"] != config_hash(learner.cfg)}
