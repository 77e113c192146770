"""What the benchmarks share: setup errors, free ports for their own generators, JSON out."""

from __future__ import annotations

import json
from pathlib import Path

from stream_rl.transport import free_ports  # noqa: F401 (the benchmarks' generators take free ports)


class BenchSetupError(ValueError):
    """The benchmark's own arguments cannot give a result."""


def emit(result: dict, out_json: str | None) -> dict:
    """Print the result as JSON (and write it to `out_json`)."""
    text = json.dumps(result, indent=2)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(text + "\n")
    print(text)
    return result
