"""The learner's GPU readiness check (`scripts/gpu_check.sh`): the real
learner path on one CUDA device in bf16, on a machine with torch but no
vLLM and no network. Prints one JSON object; exits 1 when a check failed,
2 when there is no CUDA device to check on.

Checks, in order (each reports its numbers and `ok`):

- no_vllm: importing the learner, its benchmark and the weight-bucket
  sender loads no vLLM module (a fresh interpreter);
- model: a random Qwen3 (>= 100M parameters; `--small`: the tiny world's
  size) saved with the tiny world's tokenizer, both built here, so nothing is
  downloaded;
- varlen_kernel: varlen attention's kernel (torch's flash varlen on CUDA
  bf16) against SDPA per sequence, outputs and gradients, GQA included;
- varlen_logprobs: the model's response log-probs under varlen attention,
  HF's dense packed mask and padded rows, each in the check's dtype, against
  the fp32 dense pass: varlen's error must be of the size of HF's;
- learner_step: `Learner.step` twice on packed rows (varlen), finite loss
  and gradient norm, weights moved;
- attention_timing: one packed row of 8 x 512 tokens, forward + backward,
  varlen against HF's dense packed path (the ratio);
- weight_buckets: `plan_buckets`/`pack_bucket` into device buffers, a
  broadcast over a one-rank `weight_group` (nccl on CUDA, gloo on CPU)
  from a thread as the sender does, and the unpacked bytes against the
  weights';
- bench_learner: `bench learner`'s core on the model (its JSON).

`--device cpu --small` runs the same steps on a small model on the CPU in
fp32 (the unit test's dry run): the CUDA run differs only in device and dtype.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

NO_CUDA = ("gpu_check: no CUDA device (torch.cuda.is_available() is False); this check needs one GPU. "
           "For a dry run of the same steps on the CPU: --device cpu --small")
LEARNER_MODULES = ("stream_rl.learner.trainer", "stream_rl.learner.varlen_attention", "benchmarks.learner",
                   "stream_rl.weights_sync.torch_dist", "stream_rl.weights_sync.buckets")


def check_no_vllm() -> dict:
    code = (f"import json, sys\nfor m in {LEARNER_MODULES!r}: __import__(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm')))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    if out.returncode:
        return {"ok": False, "error": out.stderr.strip().splitlines()[-1:]}
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    return {"ok": not loaded, "vllm_modules": loaded[:10]}


def model_shape(small: bool) -> dict:
    if small:
        return dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
    # ~141M parameters: 12 layers of 1024, GQA 16/8 heads of 64.
    return dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                num_key_value_heads=8, head_dim=64)


def build_checkpoint(out: Path, small: bool, seed: int) -> dict:
    """A random Qwen3 with the tiny world's tokenizer, saved as a checkpoint;
    and tiny-world prompts to sample from (`bench learner` reads both)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from stream_rl.tiny import task
    from stream_rl.tiny.model import EOS, build_tokenizer

    tok = build_tokenizer()
    eos = tok.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **model_shape(small))
    model = Qwen3ForCausalLM(cfg).float()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    with (out / "train.jsonl").open("w") as f:
        for p in task.make_dataset(256, seed):
            f.write(json.dumps({"prompt": p.prompt, "solution": p.solution, "answer": p.answer}) + "\n")
    return {"ok": small or params >= 100_000_000, "parameters": params, **model_shape(small)}


def job_config(ckpt: Path, device: str, dtype: str, small: bool):
    import yaml

    from stream_rl.config import config_from_dict

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml").read_text())
    raw["model"].update(path=str(ckpt / "model"), dtype=dtype, max_model_len=4096)
    raw["data"]["path"] = str(ckpt / "train.jsonl")
    raw["pruner"] = {"mode": "none"}
    raw["generator"].update(target_groups=4 if small else 8, group_size=4 if small else 8,
                            max_tokens=48 if small else 256)
    raw["learner"].update(device=device, threads=0, offpolicy="none", pack_row_tokens=256 if small else 2048,
                          micro_batch_tokens=4096 if small else 16384, lr=1e-5, attention="auto")
    return config_from_dict(raw)


def random_seqs(n: int, vocab: int, longest: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(4, longest // 4))],
             [rng.randrange(3, vocab) for _ in range(rng.randint(1, longest * 3 // 4))]) for _ in range(n)]


def check_varlen_kernel(device: str, dtype) -> dict:
    """The dispatched kernel against SDPA per sequence on random q/k/v."""
    import torch

    from stream_rl.learner import varlen_attention as va

    g = torch.Generator(device="cpu").manual_seed(0)
    lengths = [1, 7, 130, 511, 64, 300]
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    heads, kv, dim, width = 8, 2, 64, sum(lengths)
    make = lambda h: torch.randn(1, h, width, dim, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    q, k, v = make(heads), make(kv), make(kv)
    mod = torch.nn.Module()
    kernel = va.kernel_for(q)
    res = {"kernel": kernel}
    outs = {}
    for name in dict.fromkeys([kernel, "sdpa_per_sequence"]):
        o, _ = va.varlen_attention_forward(mod, q, k, v, None, scaling=dim ** -0.5, position_ids=pos, kernel=name)
        grads = torch.autograd.grad((o.float() ** 2).sum(), (q, k, v))
        outs[name] = (o.detach().float(), [t.float() for t in grads])
    ref_o, ref_g = outs["sdpa_per_sequence"]
    o, gr = outs[kernel]
    res["out_max_abs_diff"] = float((o - ref_o).abs().max())
    res["grad_max_rel_diff"] = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
                                   for a, b in zip(gr, ref_g))
    tol = 0.0 if kernel == "sdpa_per_sequence" else 2e-2
    res["ok"] = res["out_max_abs_diff"] <= max(tol, 1e-6) and res["grad_max_rel_diff"] <= max(tol, 1e-6)
    if device.startswith("cuda") and kernel == "sdpa_per_sequence":
        res["ok"] = False
        res["error"] = "on CUDA bf16 the varlen kernel should be torch's flash varlen, not the per-sequence fallback"
    return res


def check_varlen_logprobs(model_dir: Path, device: str, dtype, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from stream_rl.learner import varlen_attention as va
    from stream_rl.learner.packing import pack_layout, pad_layout, response_logprobs

    load = lambda dt, attn: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        str(model_dir), dtype=dt, attn_implementation=attn).to(device).eval()
    seqs = random_seqs(24, 259, 600, seed)
    packed, padded = pack_layout(seqs, 2048, 0).to(device), pad_layout(seqs, 0).to(device)
    with torch.no_grad():
        exact = response_logprobs(load(torch.float32, "sdpa"), packed)
        dense, varlen = load(dtype, "sdpa"), load(dtype, va.register())
        err = lambda m, lay: float((response_logprobs(m, lay) - exact).abs().max())  # noqa: E731
        res = {"rows": int(packed.ids.shape[0]), "width": int(packed.ids.shape[1]), "sequences": len(seqs),
               "varlen_max_abs_err": err(varlen, packed), "dense_packed_max_abs_err": err(dense, packed),
               "padded_max_abs_err": err(dense, padded),
               "varlen_vs_dense_max_abs_diff": float((response_logprobs(varlen, packed)
                                                      - response_logprobs(dense, packed)).abs().max())}
    hf = max(res["dense_packed_max_abs_err"], res["padded_max_abs_err"])
    res["ok"] = res["varlen_max_abs_err"] <= 1.5 * hf + (1e-4 if dtype == torch.float32 else 0.02)
    return res


def check_learner_step(cfg, seed: int) -> dict:
    import math

    import torch

    from stream_rl.learner.samples import Sample
    from stream_rl.learner.trainer import Learner

    torch.manual_seed(seed)
    if cfg.learner.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()  # the step's peak, not the earlier checks'
    lrn = Learner(cfg)
    attn = lrn.model.config._attn_implementation
    seqs = random_seqs(32, lrn.model.config.vocab_size, 600, seed + 1)
    rng = random.Random(seed)  # advantages that do not cancel: a loss that is not 0 by symmetry
    samples = [Sample(p, r, rng.uniform(-1.0, 1.0), None, [0] * len(r), group_id=f"g{i // 4}", sample_id=str(i),
                      group_size=4) for i, (p, r) in enumerate(seqs)]
    before = [p.detach().clone() for p in lrn.model.parameters()]
    stats, times = [], []
    for _ in range(2):
        t = time.perf_counter()
        stats.append(lrn.step(samples, policy_version=0))
        if cfg.learner.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(round(time.perf_counter() - t, 3))
    moved = sum(int(not torch.equal(a, p.detach())) for a, p in zip(before, lrn.model.parameters()))
    res = {"attn_implementation": attn, "loss": [s["loss"] for s in stats],
           "grad_norm": [s["grad_norm"] for s in stats], "padding_fraction": stats[-1]["padding_fraction"],
           "step_s": times, "parameters_moved": moved,
           "tokens": sum(len(p) + len(r) for p, r in seqs)}
    if cfg.learner.device.startswith("cuda"):
        res["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    res["ok"] = (attn == "stream_rl_varlen" and moved > 0 and stats[0]["loss"] != 0.0
                 and all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in stats))
    return res


def check_attention_timing(model_dir: Path, device: str, dtype, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from stream_rl.learner import varlen_attention as va
    from stream_rl.learner.packing import pack_layout, response_logprobs

    seqs = random_seqs(8, 259, 512, 7)
    seqs = [(p[:4] * 16, (r * 512)[:448]) for p, r in seqs]  # 8 x (64 + 448) = one row of 4096
    lay = pack_layout(seqs, 4096, 0).to(device)
    res = {"row": list(lay.ids.shape)}
    for attn in ("sdpa", va.register()):
        m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=attn).to(device)
        runs = []
        for _ in range(repeats + 1):  # the first is a warm-up
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            response_logprobs(m, lay).sum().backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - t)
        key = "dense" if attn == "sdpa" else "varlen"
        res[f"{key}_s"] = round(min(runs[1:]), 4)
        if device.startswith("cuda"):
            res[f"{key}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        del m
    res["dense_over_varlen"] = round(res["dense_s"] / res["varlen_s"], 2)
    res["ok"] = True  # reported, not a pass/fail: the ratio depends on the model and device
    return res


def check_weight_buckets(model_dir: Path, device: str, dtype, bucket_mb: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from stream_rl.transport import free_ports
    from stream_rl.weights_sync.buckets import bucket_nbytes, pack_bucket, plan_buckets, unpack_bucket
    from stream_rl.weights_sync.group import weight_group

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    backend = "nccl" if device.startswith("cuda") else "gloo"
    buckets = plan_buckets(weights, bucket_mb * 2 ** 20)
    bufs = [torch.zeros(bucket_nbytes(b), dtype=torch.uint8, device=device) for b in buckets]
    t = time.perf_counter()
    for b, buf in zip(buckets, bufs):
        pack_bucket(weights, b, buf)
    pack_s = time.perf_counter() - t
    pg, store = weight_group("127.0.0.1", free_ports(1)[0], 0, 1, backend, 120.0)
    errors: list[BaseException] = []

    def send():  # the sender broadcasts from a thread of its own
        try:
            for work in [pg.broadcast(buf, 0) for buf in bufs]:
                work.wait()
        except BaseException as err:
            errors.append(err)

    th = threading.Thread(target=send)
    t = time.perf_counter()
    th.start()
    th.join()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    bcast_s = time.perf_counter() - t
    mismatched = [name for b, buf in zip(buckets, bufs) for name, got in unpack_bucket(buf, b)
                  if not torch.equal(got.view(-1).view(torch.uint8), weights[name].view(-1).view(torch.uint8))]
    nbytes = sum(bucket_nbytes(b) for b in buckets)
    return {"ok": not errors and not mismatched, "backend": backend, "buckets": len(buckets), "bytes": nbytes,
            "tensors": len(weights), "mismatched": mismatched[:5], "pack_s": round(pack_s, 4),
            "broadcast_s": round(bcast_s, 4), "error": repr(errors[0]) if errors else None}


def check_bench_learner(cfg, repeats: int) -> dict:
    from benchmarks.learner import bench_learner

    res = bench_learner(cfg, repeats)
    diffs = [c.get("logprob_max_abs_diff_vs_padded") for c in res["configs"].values()]
    return {"ok": True, "result": res, "logprob_max_abs_diff_vs_padded": [d for d in diffs if d is not None]}


def run_checks(device: str, small: bool, repeats: int, seed: int = 0) -> dict:
    import torch

    dtype_name = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = getattr(torch, dtype_name)
    out: dict = {"device": device, "dtype": dtype_name, "small": small, "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None, "checks": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        ckpt = Path(tmp)
        steps = [
            ("no_vllm", check_no_vllm),
            ("model", lambda: build_checkpoint(ckpt, small, seed)),
            ("varlen_kernel", lambda: check_varlen_kernel(device, dtype)),
            ("varlen_logprobs", lambda: check_varlen_logprobs(ckpt / "model", device, dtype, seed)),
            ("learner_step", lambda: check_learner_step(job_config(ckpt, device, dtype_name, small), seed)),
            ("attention_timing", lambda: check_attention_timing(ckpt / "model", device, dtype, repeats)),
            ("weight_buckets", lambda: check_weight_buckets(ckpt / "model", device, dtype, 1 if small else 64)),
            ("bench_learner", lambda: check_bench_learner(job_config(ckpt, device, dtype_name, small), repeats)),
        ]
        for name, step in steps:
            t = time.perf_counter()
            try:
                res = step()
            except Exception as err:  # reported, and the remaining checks still run
                res = {"ok": False, "error": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc().splitlines()[-6:]}
            res["seconds"] = round(time.perf_counter() - t, 2)
            out["checks"][name] = res
            if name == "model" and not res["ok"] and "error" in res:
                break  # nothing else can run without the checkpoint
            print(f"gpu_check: {name}: {'ok' if res['ok'] else 'FAILED'} ({res['seconds']} s)", file=sys.stderr)
    out["ok"] = all(c["ok"] for c in out["checks"].values())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    ap.add_argument("--small", action="store_true", help="a small model instead of the >= 100M one")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (attention timing, bench learner)")
    ap.add_argument("--out-json", help="also write the JSON here")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"ok": False, "device": args.device, "error": NO_CUDA}))
        print(NO_CUDA, file=sys.stderr)
        return 2
    res = run_checks(args.device, args.small, args.repeats)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out_json:
        Path(args.out_json).write_text(text + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
