"""`stream-rl bench weight-sync`: learner -> generator weight syncs per backend.

The model is a Qwen3-architecture causal LM (the tiny model's family and
tokenizer) with random weights and at least 100M parameters, built here and
cached under `.cache/bench-weight-sync-model/<spec hash>`; `model.dtype`
(float32 in configs/tiny.yaml) is what it is saved in and what vLLM loads.
One generator serves it for every backend (torch_dist, shm, file).

Generation is kept busy the whole time: `concurrency` requests with
`ignore_eos` and a long budget are in flight, and each one that ends is
replaced at once (also during a sync). A reader thread owns the generator's
stream and timestamps every token chunk on arrival (the generator streams
chunks of `CHUNK_TOKENS` here, for resolution), so tokens can be attributed
to the sync and to the pause within it. Because that thread owns
the stream, a sync is `UpdateWeights` sent on the request channel and the
`WeightsUpdated` reply taken from the reader: the same protocol exchange as
`GeneratorClient.update_weights`, which would read the stream itself.

Per backend: 1 untimed warm-up sync (the first torch_dist sync builds the
process group), then `steps` timed ones, each with freshly perturbed weights
(a learner-side state dict of CPU tensors in checkpoint format, a tied
lm_head left out like `Learner.weights_for_sync`). Per sync:

- sync_s: from calling `sender.stage` to the generator's `WeightsUpdated`
  (plus `sender.release`);
- stage_s: the part inside `stage` (torch_dist: packing the buckets; file,
  shm: writing the safetensors file);
- transfer_s (torch_dist): from `stage` returning to the sender's broadcast
  thread finishing;
- pause_s: how long the generator paused generation (from `WeightsUpdated`);
  load_s: the generator's time from the request to serving the new version;
- tokens generated during the sync, during its pause, and per second against
  a baseline window of the same load with no sync.

gb_per_s = synced bytes / mean sync_s / 1e9. After the last sync of each
backend, a greedy continuation of a fixed prompt is generated and its
log-probs compared with those of the Hugging Face model holding the synced
weights (logprob_max_abs_diff).

On a small CPU machine everything shares the cores: vLLM's CPU worker runs
the model on the cores it does not reserve (one OpenMP thread on a 2-CPU
machine), and the engine front end, the generator service, this process's
staging and broadcast, and the worker's receive thread and reload all
compete with it.

The model, the stream reader, the load and one timed sync are in
`benchmarks/weight_sync_measure.py`; this module runs them per backend and
reports.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from benchmarks.common import BenchSetupError, emit, with_free_ports
from benchmarks.weight_sync_measure import (CACHE_DIR, CHUNK_TOKENS, Load, StreamReader, build_bench_model, perturb,
                                            sync_once, sync_state_dict)
from stream_rl.config import Config, ConfigError, config_from_dict, config_to_dict

BACKENDS: tuple[str, ...] = ("torch_dist", "shm", "file")
# hidden 1024, 8 layers, MLP 3072, 16 query / 8 KV heads of 64, the tiny
# tokenizer's 259 tokens, tied embeddings: 100,946,944 parameters.
DEFAULT_SPEC: dict = {
    "hidden_size": 1024, "num_hidden_layers": 8, "intermediate_size": 3072, "num_attention_heads": 16,
    "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True, "max_position_embeddings": 512,
    "seed": 0,
}
MIN_PARAMS = 100_000_000
CHECK_PROMPT = "weights sync check: 271828 + 314159 ="
CHECK_TOKENS = 32


# --- the benchmark -----------------------------------------------------------------

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def bench_config(cfg: Config, model_path: Path, dtype: str, concurrency: int, max_model_len: int) -> Config:
    raw = config_to_dict(with_free_ports(cfg))
    raw["model"].update(path=str(model_path), dtype=dtype, max_model_len=max_model_len)
    raw["data"]["max_prompt_tokens"] = min(raw["data"]["max_prompt_tokens"], max_model_len - 1)
    raw["generator"].update(max_num_seqs=concurrency + 2, seeded=False,
                            # Small chunks: token arrival times resolve the sync and its pause.
                            chunk_tokens=min(CHUNK_TOKENS, raw["generator"]["max_tokens"]))
    raw["pruner"]["mode"] = "none"
    raw["run"]["progress"] = False
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise BenchSetupError(str(err)) from None


def check_logprobs(model, load: Load, prompt_ids: list[int], version: int) -> dict:
    """Greedy tokens from the generator vs the HF model's log-probs of them."""
    import torch

    from stream_rl.learner.trainer import token_logprobs

    chunks = load.generate(prompt_ids, CHECK_TOKENS)
    toks = [t for c in chunks for t in c.token_ids]
    gen_lp = torch.tensor([lp for c in chunks for lp in c.logprobs], dtype=torch.float64)
    versions = {v for c in chunks for v in c.versions}
    ids = torch.tensor([prompt_ids + toks])
    with torch.no_grad():
        ref = token_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1:].double()
    n = min(len(ref), len(gen_lp))
    return {"logprob_max_abs_diff": float((ref[:n] - gen_lp[:n]).abs().max()) if n else float("nan"),
            "logprob_check_tokens": n, "logprob_check_versions_ok": versions == {version}}


def bench_weight_sync(cfg: Config, steps: int = 5, *, spec: dict | None = None, backends=BACKENDS,
                      cache_dir: str | os.PathLike = CACHE_DIR, workdir: str | None = None, concurrency: int = 12,
                      max_model_len: int = 512, baseline_s: float = 5.0, min_params: int = MIN_PARAMS) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stream_rl.generator.client import GeneratorProcess
    from stream_rl.weights_sync import make_weight_sender

    if steps < 1:
        raise BenchSetupError(f"--steps (timed syncs per backend) must be >= 1; got {steps}")
    bad = [b for b in backends if b not in BACKENDS]
    if bad or not backends:
        raise BenchSetupError(f"backends must be among {', '.join(BACKENDS)}; got {list(backends)}")
    spec = dict(DEFAULT_SPEC if spec is None else spec)
    dtype = cfg.model.dtype
    t_start = time.time()
    model_path, info = build_bench_model(spec, dtype, cache_dir)
    if info["params"] < min_params:
        raise BenchSetupError(f"the benchmark model has {info['params']:,} parameters, below {min_params:,}")
    cfg = bench_config(cfg, model_path, dtype, concurrency, max_model_len)
    tok = AutoTokenizer.from_pretrained(model_path)
    load_prompt = tok("12 34 56 =").input_ids
    check_prompt = tok(CHECK_PROMPT).input_ids
    max_tokens = max_model_len - len(load_prompt) - 1

    # The learner side: the HF model in float32 (or the checkpoint's dtype)
    # and its weights as synced; perturbing them moves the model too.
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    weights = sync_state_dict(model)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    tol = 1e-3 if dtype == "float32" else 5e-2

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=workdir, prefix="bench-weight-sync-") as tmp:
        t_gen = time.time()
        gen = GeneratorProcess(cfg, Path(tmp) / "generator")
        engine_start_s = time.time() - t_gen
        reader = StreamReader(gen)
        reader.start()
        try:
            load = Load(gen, reader, load_prompt, concurrency, max_tokens)
            load.run_for(2.0)  # past the first prefills: a steady load
            version = gen.version
            for backend in backends:
                bcfg = msgspec.structs.replace(cfg, weights_sync=msgspec.structs.replace(cfg.weights_sync,
                                                                                         backend=backend))
                run_dir = Path(tmp) / backend
                run_dir.mkdir()
                sender = make_weight_sender(bcfg, run_dir)
                try:
                    version += 1
                    perturb(weights, seed=version)
                    warm = sync_once(gen, load, sender, weights, version)
                    # The load alone, right before the timed syncs.
                    load.pump()
                    t0 = time.perf_counter()
                    load.run_for(baseline_s)
                    baseline_tps = reader.tokens_between(t0, time.perf_counter()) / (time.perf_counter() - t0)
                    runs = []
                    for _ in range(steps):
                        version += 1
                        perturb(weights, seed=version)
                        runs.append(sync_once(gen, load, sender, weights, version))
                    check = check_logprobs(model, load, check_prompt, version)
                finally:
                    sender.close()
                    if backend == "shm":  # its directory is in /dev/shm, outside the temporary one
                        shutil.rmtree(getattr(sender, "dir", run_dir), ignore_errors=True)
                results[backend] = backend_result(runs, warm, nbytes, baseline_tps, check)
        finally:
            reader.stop()
            gen.stop()

    best = max(results, key=lambda b: results[b]["gb_per_s"])
    result = {"benchmark": "weight_sync", "best_backend": best, "backends": results}
    result["targets"] = {
        "pause_at_most_half_sync": {b: r["pause_over_sync"] <= 0.5 for b, r in results.items()},
        "best_pause_at_most_half_sync": results[best]["pause_over_sync"] <= 0.5,
        "gb_per_s_at_least_1": results[best]["gb_per_s"] >= 1.0,
        "logprobs_match": all(r["logprob_max_abs_diff"] < tol and r["logprob_check_versions_ok"]
                              for r in results.values()),
    }
    result["setup"] = {
        "model": str(model_path), "architecture": "Qwen3ForCausalLM (random weights)", "spec": spec,
        "params": info["params"], "sync_tensors": info["sync_tensors"], "sync_params": info["sync_params"],
        "bytes": nbytes, "dtype": dtype, "model_cached": info["cached"], "model_build_s": info["build_s"],
        "bucket_mb": cfg.weights_sync.bucket_mb, "steps": steps, "warmup": 1, "concurrency": concurrency,
        "max_tokens": max_tokens, "max_model_len": max_model_len, "chunk_tokens": cfg.generator.chunk_tokens,
        "baseline_s": baseline_s,
        "logprob_tol": tol, "engine_start_s": round(engine_start_s, 1), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
        "wall_s": round(time.time() - t_start, 1),
    }
    return result


def backend_result(runs: list[dict], warm: dict, nbytes: int, baseline_tps: float, check: dict) -> dict:
    sync = [r["sync_s"] for r in runs]
    pause = [r["pause_s"] for r in runs]
    mean_sync, mean_pause = statistics.fmean(sync), statistics.fmean(pause)
    tok_sync = sum(r["tokens_during_sync"] for r in runs)
    tok_pause = sum(r["tokens_during_pause"] for r in runs)
    outside_s = sum(r["outside_pause_s"] for r in runs)
    rnd = lambda xs: [round(x, 4) for x in xs]  # noqa: E731
    return {
        "syncs": len(runs), "bytes": nbytes,
        "sync_s": mean_sync, "sync_s_min": min(sync), "sync_s_all": rnd(sync),
        "pause_s": mean_pause, "pause_s_min": min(pause), "pause_s_all": rnd(pause),
        "gb_per_s": nbytes / mean_sync / 1e9, "gb_per_s_max": nbytes / min(sync) / 1e9,
        "pause_over_sync": mean_pause / mean_sync,
        # Where the time goes: staging in this process, the background
        # transfer (torch_dist), the generator's part (load_s, of which pause_s).
        "stage_s": statistics.fmean(r["stage_s"] for r in runs),
        "stage_s_all": rnd([r["stage_s"] for r in runs]),
        "transfer_s": _mean(r["transfer_s"] for r in runs),
        "load_s": statistics.fmean(r["load_s"] for r in runs),
        "load_before_pause_s": statistics.fmean(r["load_s"] - r["pause_s"] for r in runs),
        "warmup_sync_s": warm["sync_s"], "warmup_pause_s": warm["pause_s"],
        # Generation went on: tokens that arrived during the syncs, during
        # their pauses, and the rate outside the pauses vs the load alone.
        "tokens_during_syncs": tok_sync, "tokens_during_pauses": tok_pause,
        "tokens_per_s_during_syncs": tok_sync / sum(sync),
        "tokens_per_s_outside_pauses": sum(r["tokens_outside_pause"] for r in runs) / outside_s
        if outside_s > 0 else None,
        "tokens_per_s_baseline": baseline_tps,
        **check,
    }


def main(cfg: Config, out_json: str | None, steps: int) -> dict:
    return emit(bench_weight_sync(cfg, steps), out_json)
