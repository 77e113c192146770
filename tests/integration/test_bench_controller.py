"""`stream-rl bench controller` at a low rate: two load-generator connections
stream into the real controller (no engine), on both wires."""

from __future__ import annotations

import json
import math

from tests.conftest import ROOT


def test_two_connections_lose_nothing_and_report_every_key(tiny_world, tmp_path):
    from stream_rl.cli import main

    d = tiny_world["dir"]
    out = tmp_path / "controller.json"
    args = ["bench", "controller", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"model.path={d / 'model'}", "--set", f"data.path={d / 'data' / 'train.jsonl'}",
            "--connections", "2", "--wire", "chunk,batch", "--quick", "--json", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert "max_tokens_per_s_at_64" in res and res["max_tokens_per_s_at_64"] is None  # 64 not measured
    assert res["wire"] == "batch" and res["results"] == res["by_wire"]["batch"]["results"]
    for wire in ("chunk", "batch"):  # both measured, interleaved
        (r,) = res["by_wire"][wire]["results"]
        for key in ("connections", "max_tokens_per_s", "lost_tokens", "p99_delay_s", "cpu_s_per_1k_tokens"):
            assert key in r
        assert r["connections"] == 2 and r["wire"] == wire and r["lost_tokens"] == 0
        assert r["max_tokens_per_s"] > 10_000  # the first trial, 50k tokens/s offered, holds on any box
        assert math.isfinite(r["p99_delay_s"]) and 0 < r["p99_delay_s"] <= 0.1
        assert r["cpu_s_per_1k_tokens"] > 0
        for t in r["trials"]:
            assert t["lost_tokens"] == 0 and t["chunks_out_of_order"] == 0 and t["chunks_unmatched"] == 0
    assert main(args[:-2] + ["--connections", "0"]) == 2
