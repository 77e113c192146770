"""Building the vLLM engine and turning its outputs into wire chunks."""

from __future__ import annotations

import os

from stream_rl.config import Config

WORKER_EXTENSION = "stream_rl.generator.worker_ext.StreamRLWorkerExtension"


def build_engine(cfg: Config):
    """An `AsyncLLM` for the policy, with stream_rl's worker extension."""
    g = cfg.generator
    # The CPU engine sizes its KV cache from this variable, not from
    # gpu_memory_utilization; it must be set before vLLM is imported.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(g.cpu_kvcache_gib))
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=cfg.model.path,
        dtype=cfg.model.dtype,
        max_model_len=cfg.model.max_model_len,
        trust_remote_code=cfg.model.trust_remote_code,
        gpu_memory_utilization=g.gpu_memory_utilization,
        max_num_seqs=g.max_num_seqs,
        enforce_eager=g.enforce_eager,
        tensor_parallel_size=g.tensor_parallel_size,
        seed=cfg.run.seed,
        enable_prefix_caching=True,
        worker_extension_cls=WORKER_EXTENSION,
        disable_log_stats=True,
    )
    return AsyncLLM.from_engine_args(args)


def sampled_logprobs(token_ids: list[int], logprobs) -> list[float]:
    """The log-prob of each sampled token from a vLLM delta's logprobs."""
    if not logprobs:
        return []
    return [float(entry[tid].logprob) for tid, entry in zip(token_ids, logprobs)]
