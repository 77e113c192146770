"""Loading a config: YAML, `--set section.key=value` overrides applied on
top before validation (so an override is checked exactly like the file),
eval's answer key inherited from data's, and errors that name the
offending field by its dotted path and, for enumerations, the allowed
values."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from stream_rl.config.checks import check
from stream_rl.config.sections import Config, ConfigError

# --- error messages ---------------------------------------------------------

def _field_type(path: list[str]) -> Any:
    """The annotation of the field at a dotted path, or None if unknown."""
    tp: Any = Config
    for name in path:
        hints = typing.get_type_hints(tp, include_extras=True) if isinstance(tp, type) else {}
        if name not in hints:
            return None
        tp = hints[name]
    return tp


def _allowed(tp: Any) -> str | None:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        return ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is bool:
        return "true, false"
    return None


def _explain(err: msgspec.ValidationError) -> ConfigError:
    msg = str(err)
    # msgspec reports the location as "- at `$.section.key`".
    path: list[str] = []
    if "- at `$." in msg:
        loc = msg.rsplit("- at `$.", 1)[1].rstrip("`")
        path = [p for p in loc.split(".") if p and not p.startswith("[")]
    dotted = ".".join(path) or "<root>"
    if msg.startswith("Object contains unknown field"):
        unknown = msg.split("`")[1]
        section = _field_type(path) if path else Config
        known = sorted(getattr(section, "__struct_fields__", ()))
        where = f"{dotted}.{unknown}" if path else unknown
        return ConfigError(f"unknown config field '{where}'; known fields here: {', '.join(known)}")
    detail = msg.split(" - at ")[0]
    allowed = _allowed(_field_type(path)) if path else None
    extra = f"; allowed values: {allowed}" if allowed else ""
    return ConfigError(f"invalid config field '{dotted}': {detail}{extra}")


# --- loading ----------------------------------------------------------------

def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not (len(parts) == 2 and all(parts) or parts in (["mode"], ["launch"])):
        raise ConfigError(f"override key '{key}' must be section.key (e.g. learner.lr), mode or launch")
    # YAML gives overrides the same scalar typing as the file (1e-6, true, null).
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a mapping of sections")
    # A section left empty in YAML (`learner:` with every key commented out)
    # reads as null: it means "all defaults".
    raw = {k: (dict(v) if isinstance(v, dict) else {} if v is None else v) for k, v in raw.items()}
    for item in overrides:
        parts, value = _parse_override(item)
        if len(parts) == 1:  # a top-level key
            raw[parts[0]] = value
            continue
        section, key = parts
        if section not in Config.__struct_fields__:
            raise ConfigError(
                f"unknown config section '{section}'; known sections: {', '.join(Config.__struct_fields__)}")
        current = raw.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        current[key] = value
    _inherit_eval_answer_key(raw)
    if isinstance(raw.get("generator"), dict) and "mode" in raw["generator"]:
        raise ConfigError(f"generator.mode ({raw['generator']['mode']!r}) is gone: the schedule is the top-level "
                          "key `mode` (sync, april or stream); generator.mode=april is mode=april, "
                          "generator.mode=sync is mode=sync")
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as err:
        raise _explain(err) from None
    check(cfg)
    return cfg


EVAL_INHERITS = ("answer_field", "answer_regex", "answer_match")


def _inherit_eval_answer_key(raw: dict) -> None:
    """eval's answer key defaults to data's: the keys eval leaves out are
    copied from the data section (as written, so errors name data's)."""
    data, ev = raw.get("data"), raw.get("eval")
    if not isinstance(data, dict) or (ev is not None and not isinstance(ev, dict)):
        return  # msgspec names the section that is not a mapping
    ev = raw.setdefault("eval", {})
    for key in EVAL_INHERITS:
        if key not in ev and key in data:
            ev[key] = data[key]


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    return config_from_dict(raw, overrides)


def config_to_dict(cfg: Config) -> dict:
    return msgspec.to_builtins(cfg)
