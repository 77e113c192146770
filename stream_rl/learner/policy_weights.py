"""The policy's weights as the generators load them, from whatever a learner
holds: a torch module, a state dict, or a Hugging Face directory.

Every tensor is checked against the model the engines serve (names, shapes)
before anything is sent: a state dict with a missing, extra or misshapen
tensor is refused whole, naming them, so no generator ever serves half an
update (the transfer itself is all-or-nothing per generator: docs/weight-sync.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_weights(weights) -> dict[str, torch.Tensor]:
    """Named tensors from an `nn.Module` (its state dict), a mapping of
    names to tensors, or a Hugging Face model directory (its *.safetensors,
    else its pytorch_model*.bin)."""
    if isinstance(weights, torch.nn.Module):
        return weights.state_dict()
    if isinstance(weights, (str, Path)):
        return _read_directory(Path(weights))
    if isinstance(weights, Mapping):
        return dict(weights)
    raise TypeError(f"weights: expected an nn.Module, a state dict or a Hugging Face directory, got "
                    f"{type(weights).__name__}")


def _read_directory(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_dir():
        raise FileNotFoundError(f"weights: {path} is not a directory")
    out: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        for f in files:
            out.update(load_file(str(f)))
        return out
    files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"weights: no *.safetensors or pytorch_model*.bin in {path}")
    for f in files:
        out.update(torch.load(f, map_location="cpu", weights_only=True))
    return out


class PolicyWeights:
    """The names, shapes and dtype the served model's weights have, read from
    its config on the meta device (nothing allocated); `check` turns a
    learner's weights into the set the weight senders stage."""

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        # A tied lm_head is the embedding: the engine ties it back on load.
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
                       if not (self.tied and k == "lm_head.weight")}
        self.dtype = DTYPES[dtype]
        self.hidden_size = config.hidden_size

    def check(self, weights) -> dict[str, torch.Tensor]:
        """The policy's tensors, detached, contiguous, in the served dtype;
        ValueError naming every missing, unexpected or misshapen tensor."""
        named = read_weights(weights)
        if self.tied:
            named.pop("lm_head.weight", None)
        missing = sorted(set(self.shapes) - set(named))
        extra = sorted(set(named) - set(self.shapes))
        shape = sorted(f"{k} {tuple(named[k].shape)} (the model's {self.shapes[k]})" for k in self.shapes
                       if k in named and tuple(named[k].shape) != self.shapes[k])
        problems = [f"{what}: {', '.join(items[:5])}" + (f" and {len(items) - 5} more" if len(items) > 5 else "")
                    for what, items in (("missing", missing), ("not in the model", extra),
                                        ("wrong shape", shape)) if items]
        if problems:
            raise ValueError("weights do not fit the served model (nothing was sent): " + "; ".join(problems))
        return {k: v.detach().to(self.dtype).contiguous() for k, v in named.items()}
