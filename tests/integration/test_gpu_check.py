"""The GPU check's dry run: every step of `scripts/gpu_check.sh` (the real
learner step, varlen against HF's paths, the weight buckets over a one-rank
gloo group, bench learner) on a small model on the CPU. On a GPU the same
code runs with device cuda and bf16."""

from __future__ import annotations


def test_dry_run_on_cpu_passes_every_check(one_torch_thread):
    from benchmarks.gpu_check import run_checks

    res = run_checks("cpu", small=True, repeats=1)
    failed = {k: v for k, v in res["checks"].items() if not v["ok"]}
    assert not failed, failed
    assert set(res["checks"]) == {"no_vllm", "model", "varlen_kernel", "varlen_logprobs", "learner_step",
                                  "attention_timing", "weight_buckets", "bench_learner"}
    c = res["checks"]
    assert c["no_vllm"]["vllm_modules"] == []
    assert c["learner_step"]["attn_implementation"] == "stream_rl_varlen"
    assert c["varlen_kernel"]["kernel"] == "sdpa_per_sequence"
    assert c["varlen_logprobs"]["varlen_vs_dense_max_abs_diff"] < 1e-4  # fp32
    assert c["weight_buckets"]["backend"] == "gloo" and c["weight_buckets"]["mismatched"] == []
    assert c["weight_buckets"]["bytes"] > 0
    assert max(c["bench_learner"]["logprob_max_abs_diff_vs_padded"]) < 1e-4
    assert res["ok"] is True
