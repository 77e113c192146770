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


def with_free_ports(cfg):
    """`cfg` with its (one) generator's and its learner's addresses on free
    loopback ports, so a benchmark's job never meets another's sockets."""
    p = free_ports(4)
    local = lambda port: f"tcp://127.0.0.1:{port}"  # noqa: E731
    return msgspec.structs.replace(
        cfg, generator=msgspec.structs.replace(cfg.generator, count=1, hosts=[], request_addr=local(p[0]),
                                               stream_addr=local(p[1])),
        learner=msgspec.structs.replace(cfg.learner, addr=local(p[2]), reply_addr=local(p[3])))


def with_free_learner_ports(cfg):
    """`cfg` with its learner's addresses on fresh free loopback ports: a
    second run sharing one generator must not bind the first learner's
    (closing a socket frees its port only after ZMQ's linger)."""
    p = free_ports(2)
    return msgspec.structs.replace(cfg, learner=msgspec.structs.replace(
        cfg.learner, addr=f"tcp://127.0.0.1:{p[0]}", reply_addr=f"tcp://127.0.0.1:{p[1]}"))
