"""What the benchmarks share: setup errors, free ports for their own generators, JSON out."""

from __future__ import annotations

import json
import socket
from pathlib import Path


class BenchSetupError(ValueError):
    """The benchmark's own arguments cannot give a result."""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sk in socks:
            sk.bind(("127.0.0.1", 0))
        return [sk.getsockname()[1] for sk in socks]
    finally:
        for sk in socks:
            sk.close()


def emit(result: dict, out_json: str | None) -> dict:
    """Print the result as JSON (and write it to `out_json`)."""
    text = json.dumps(result, indent=2)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(text + "\n")
    print(text)
    return result
