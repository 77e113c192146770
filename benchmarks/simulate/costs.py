"""Cost models: what a decode step, a prefill, an update and a weight load
take, fitted to this machine from a real `bench e2e --keep DIR` run, or an
H100-class preset (sources in docs/simulator.md)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stream_rl.metrics import read_metrics


@dataclass
class CostModel:
    name: str = "given"
    decode_a: float = 0.008  # s per decode step, whatever the batch
    decode_b: float = 0.0  # s per step per sequence in the batch
    decode_c: float = 0.0  # s per step per context token in the batch (KV reads)
    prefill_per_token: float = 0.0  # s per prompt (or continued response) token joining a step
    learner_fixed_s: float = 0.5  # s per update, whatever its size
    learner_per_token_s: float = 1e-4  # s per trained token
    stage_s: float = 0.0  # the learner's staging of weights for a sync
    load_s: float = 0.05  # a weight load, from the request to serving
    pause_s: float = 0.03  # of which generation stands still
    # Where the learner shares a core with the engines' front ends and the
    # controller (the 2-core CPU box, docs/capacity.md), a decode step takes
    # (1 + this) times as long while an update runs. 0 on GPU hosts.
    engine_slowdown_while_training: float = 0.0
    sources: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _lstsq(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """y = f + p x by least squares; (f, p), p >= 0 and f >= 0."""
    n = len(xs)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    p = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if n > 1 and sxx > 0 else 0.0
    p = max(0.0, p)
    f = my - p * mx
    if f < 0:  # through the origin
        f, p = 0.0, sum(y for y in ys) / max(1e-12, sum(xs))
    return f, p


def load_run(path: str | Path) -> tuple[dict, dict[str, list[dict]], Path]:
    """(the e2e JSON, {system: metrics records}, keep dir) for a `bench e2e
    --keep DIR --json FILE` run: `path` is the keep DIR (FILE beside it as
    e2e.json, or any *.json there naming its systems) or FILE (DIR beside it as keep/)."""
    path = Path(path)
    if path.is_file():
        result, keep = json.loads(path.read_text()), path.parent / "keep"
    else:
        keep = path
        cands = [path / "e2e.json", path.parent / "e2e.json"] + sorted(path.glob("*.json"))
        found = next((c for c in cands if c.is_file() and "systems" in json.loads(c.read_text())), None)
        result = json.loads(found.read_text()) if found else {"systems": {}}
    records = {s.name: read_metrics(s / "metrics.jsonl") for s in sorted(keep.iterdir())
               if (s / "metrics.jsonl").is_file() and (s / "metrics.jsonl").stat().st_size}
    if not records:
        raise FileNotFoundError(f"no system's metrics.jsonl under {keep}")
    return result, records, keep


def fit_engine(result: dict, records: dict[str, list[dict]], max_tokens: int) -> tuple[float, float, dict]:
    """decode_a, decode_b from the sync run's generation phases: a sync
    step starts all its requests at once and, when one is cut off by the
    budget (truncated_frac > 0), runs exactly `max_tokens` decode steps, so
    gen_s = a * max_tokens + b * tokens_generated (least squares over those
    steps). The engine as the pipeline drives it (its front end sharing a
    core with the controller), not the raw engine: the capacity probe's
    operating point is reported beside it for comparison."""
    src: dict = {}
    for s, v in result.get("systems", {}).items():
        cap = v.get("engine_capacity")
        if cap and cap.get("engine_capacity_tokens_per_s"):
            src.setdefault("capacity_probe", []).append(
                {"system": s, "concurrency": cap["concurrency"], "tokens_per_s": cap["engine_capacity_tokens_per_s"]})
    steps = [r for r in records.get("sync", []) if r.get("truncated_frac", 0) > 0 and r.get("gen_s")]
    if len(steps) >= 2:
        import numpy as np

        A = np.array([[float(max_tokens), float(r["tokens_generated"])] for r in steps])
        y = np.array([r["gen_s"] for r in steps])
        (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
        if a < 0 or b < 0:  # one of them alone
            a, b = (0.0, float(y.sum() / A[:, 1].sum())) if b > 0 else (float(y.sum() / A[:, 0].sum()), 0.0)
        src["sync_generation"] = {"steps": len(steps), "rms_residual_s": float(np.sqrt(np.mean((y - A @ [a, b]) ** 2)))}
        for p in src.get("capacity_probe", []):
            p["fitted_tokens_per_s_at_concurrency"] = p["concurrency"] / (a + b * p["concurrency"])
        return float(a), float(b), src
    probes = src.get("capacity_probe")
    if not probes:
        raise ValueError("no sync steps with a truncated rollout and no capacity probe to fit the engine on")
    c = statistics.fmean(p["concurrency"] for p in probes)
    r = statistics.fmean(p["tokens_per_s"] for p in probes)
    return c / r, 0.0, src  # the probe's step time, all of it fixed


def fit_from_run(path: str | Path, system: str | None = None, max_tokens: int = 320,
                 drift: bool = False) -> CostModel:
    """This machine's costs from a real `bench e2e` run (see `load_run`).
    The learner's per update and per token cost is fitted on `system`'s own
    steps (its placement shares a core with the controller: stream's
    updates are slower than sync's), or on every system's steps."""
    result, records, keep = load_run(path)
    a, b, src = fit_engine(result, records, max_tokens)
    # The machine's speed drifts (other jobs share its cores): `bench e2e`
    # measures the raw engine next to each system, and the engine fitted on
    # sync's steps runs at sync's probe over this system's probe.
    probe = {p["system"]: p["tokens_per_s"] for p in src.get("capacity_probe", [])}
    if drift and system and system != "sync" and probe.get("sync") and probe.get(system):
        src["drift_scale"] = probe["sync"] / probe[system]
        a, b = a * src["drift_scale"], b * src["drift_scale"]
    recs = records[system] if system else [r for rs in records.values() for r in rs]
    f, p = _lstsq([r["tokens_trained"] for r in recs], [r["train_s"] for r in recs])
    mean = lambda k: statistics.fmean(r.get(k, 0.0) for r in recs)  # noqa: E731
    load, pause = mean("weights_load_s"), mean("weights_pause_s")
    return CostModel(name=f"fitted:{keep}" + (f":{system}" if system else ""), decode_a=a, decode_b=b,
                     learner_fixed_s=f, learner_per_token_s=p, stage_s=mean("stage_s"), load_s=load,
                     pause_s=min(pause, load),
                     sources={"engine": src, "learner": f"least squares of train_s on tokens_trained over "
                              f"{len(recs)} steps ({system or 'all systems'})",
                              "weights": "means of stage_s, weights_load_s, weights_pause_s"})


def h100_7b() -> CostModel:
    """A 7B dense model (Qwen2.5-7B class, bf16, GQA with 4 KV heads of 128,
    28 layers) on one H100 SXM per engine, vLLM; an 8-GPU FSDP learner.
    Decode is memory-bound: each step reads the weights (15.2 GB at 3.35
    TB/s: 4.5 ms, ~7 ms achieved with kernels and scheduling), each
    sequence's KV cache (57 KB per context token: 28 x 2 x 4 x 128 x 2 B)
    and adds a little compute per sequence. Prefill: ~2 x 7.6e9 FLOP per
    token at ~400 TFLOP/s achieved. Learner: forward+backward (and the
    old-policy forward) ~ 8 x 7.6e9 FLOP per token over 8 GPUs at 40% of
    989 TFLOP/s. Weight sync: 15.2 GB over NCCL at ~25 GB/s effective."""
    return CostModel(
        name="h100_7b", decode_a=0.007, decode_b=3.0e-5, decode_c=57e3 / 3.35e12,
        prefill_per_token=2 * 7.6e9 / 4.0e14,
        learner_fixed_s=2.0, learner_per_token_s=8 * 7.6e9 / (8 * 0.4 * 9.89e14),
        stage_s=0.5, load_s=15.2 / 25.0, pause_s=0.3,
        sources={"engine": "H100 SXM 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense (NVIDIA H100 datasheet); "
                           "Qwen2.5-7B config (28 layers, 4 KV heads x 128, 7.6e9 params)",
                 "learner": "6N FLOP/token training + 2N old-policy forward (Kaplan et al. 2020), 40% MFU",
                 "weights": "bf16 weights over NCCL at ~25 GB/s effective"})
