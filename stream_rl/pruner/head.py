"""ARRoL's quality head: a 2-layer MLP on the policy's hidden state.

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


class QualityHead(nn.Module):
    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, 1))

    @property
    def hidden_size(self) -> int:
        return self.net[0].in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits s_i, one per row of `hidden` [N, hidden_size]."""
        return self.net(hidden.float()).squeeze(-1)

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
