"""ARRoL's quality head: a 2-layer MLP on the policy's hidden state.

Its input is the final hidden state at L_detect followed by a summary of how
confident the policy was in the L_detect tokens it sampled
(`token_confidence`, after DeepConf): on the tiny task the hidden state alone
ranked held-out prompts' rollouts at AUC ~0.72 (within a group ~0.58), with
the confidence summary at ~0.94 (within a group ~0.88), because a sampled
slip shows as one improbable token that the hidden state barely keeps.

One module, two homes: the learner trains it (binary cross-entropy against
final rewards, on features the engine captured, so no gradient ever reaches
the backbone) and the generator's vLLM worker evaluates it when a rollout
reaches L_detect tokens. Its weights travel with the policy's under the
`quality_head.` prefix.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

HEAD_PREFIX = "quality_head."
# Length of the `token_confidence` summary appended to the hidden state.
CONFIDENCE_FEATURES = 5


def token_confidence(logprobs) -> np.ndarray:
    """Summary of sampled-token log-probs (raw, before temperature): mean,
    minimum, mean of the 3 lowest, and the fractions below -2 and -4."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.size == 0:
        raise ValueError("token_confidence needs at least one log-prob")
    low = np.sort(lp)[:3]
    return np.array([lp.mean(), lp.min(), low.mean(), (lp < -2).mean(), (lp < -4).mean()], dtype=np.float32)


def head_input_size(hidden_size: int) -> int:
    """Width of the head's input for a model with this hidden size."""
    return hidden_size + CONFIDENCE_FEATURES


def head_features(hidden: torch.Tensor, logprobs) -> torch.Tensor:
    """The head's input for one rollout: hidden state [hidden] + confidence."""
    conf = torch.from_numpy(token_confidence(logprobs)).to(hidden.device)
    return torch.cat([hidden.float(), conf])


class QualityHead(nn.Module):
    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, 1))

    @property
    def in_features(self) -> int:
        return self.net[0].in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits s_i, one per row of `features` [N, in_features] (`head_features` rows)."""
        return self.net(features.float()).squeeze(-1)

    def named_for_sync(self) -> dict[str, torch.Tensor]:
        return {HEAD_PREFIX + k: v.detach().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_synced(cls, tensors: dict[str, torch.Tensor]) -> "QualityHead":
        """A head built from `named_for_sync` tensors (shapes give its size)."""
        sd = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items()}
        try:
            width, hidden = sd["net.0.weight"].shape
        except KeyError:
            raise ValueError(f"quality head tensors lack {HEAD_PREFIX}net.0.weight; got {sorted(tensors)}") from None
        head = cls(int(hidden), int(width))
        head.load_state_dict(sd)
        return head.eval()


def encode_features(rows: torch.Tensor) -> list[bytes]:
    """Hidden-state rows as float32 little-endian bytes (the wire format)."""
    arr = rows.detach().float().cpu().numpy().astype("<f4", copy=False)
    return [row.tobytes() for row in arr]


def decode_features(features: list[bytes]) -> torch.Tensor:
    """[N, hidden] float32 from wire feature bytes (all the same length)."""
    if not features:
        return torch.zeros((0, 0))
    sizes = {len(f) for f in features}
    if len(sizes) != 1:
        raise ValueError(f"feature vectors of different sizes: {sorted(sizes)} bytes")
    return torch.from_numpy(np.frombuffer(b"".join(features), dtype="<f4").reshape(len(features), -1).copy())
