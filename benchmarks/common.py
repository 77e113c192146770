"""What the benchmarks share: setup errors, free ports for their own generators, JSON out."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from stream_rl.transport import free_ports  # noqa: F401 (the benchmarks' generators take free ports)


class BenchSetupError(ValueError):
    """The benchmark's own arguments cannot give a result."""


def write_json(result: dict, path: str | Path) -> str:
    """Write the result as indented JSON to `path` (its folder made); the text."""
    text = json.dumps(result, indent=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text + "\n")
    return text


def emit(result: dict, out_json: str | None) -> dict:
    """Print the result as JSON (and write it to `out_json`)."""
    print(write_json(result, out_json) if out_json else json.dumps(result, indent=2))
    return result


def _local(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def _learner_on(cfg, addr_port: int, reply_port: int):
    return msgspec.structs.replace(cfg, learner=msgspec.structs.replace(
        cfg.learner, addr=_local(addr_port), reply_addr=_local(reply_port)))


def with_free_ports(cfg):
    """`cfg` with its (one) generator's and its learner's addresses on free
    loopback ports, so a benchmark's job never meets another's sockets."""
    p = free_ports(4)  # one draw: four distinct ports
    cfg = msgspec.structs.replace(cfg, generator=msgspec.structs.replace(
        cfg.generator, count=1, hosts=[], request_addr=_local(p[0]), stream_addr=_local(p[1])))
    return _learner_on(cfg, p[2], p[3])


def with_free_learner_ports(cfg):
    """`cfg` with its learner's addresses on fresh free loopback ports: a
    second run sharing one generator must not bind the first learner's
    (closing a socket frees its port only after ZMQ's linger)."""
    return _learner_on(cfg, *free_ports(2))
