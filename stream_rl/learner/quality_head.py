"""Training ARRoL's quality head on the fly.

Each complete group labels its scored survivors with their final rewards;
the features are what the engine captured at L_detect (hidden state and
token confidence, see `pruner.head`), so the head trains with binary
cross-entropy without touching the backbone (no gradient, not even a forward
pass). A replay window of recent labelled
features smooths the few labels a step brings; its weights are synced to the
generators with the policy's.
"""

from __future__ import annotations

import math

import torch

from stream_rl.config import PrunerConfig
from stream_rl.protocol import Group
from stream_rl.pruner.head import QualityHead, decode_features, head_input_size


class QualityHeadTrainer:
    def __init__(self, hidden_size: int, cfg: PrunerConfig, seed: int):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.head = QualityHead(head_input_size(hidden_size), cfg.head_hidden)
        self.cfg = cfg
        self.opt = torch.optim.Adam(self.head.parameters(), lr=cfg.head_lr)
        # Replay window as a ring of decoded rows: each row is decoded once.
        self._x = torch.zeros(cfg.head_replay, self.head.in_features)
        self._y = torch.zeros(cfg.head_replay)
        self._added = 0
        self._gen = torch.Generator().manual_seed(seed)

    def replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's features [N, in_features] and 0/1 labels [N] (ring order)."""
        n = min(self._added, len(self._y))
        return self._x[:n], self._y[:n]

    def add(self, groups: list[Group]) -> int:
        """Queue the labelled features of the groups' scored survivors."""
        feats, labels = [], []
        for g in groups:
            for r in g.survivors:
                if r.features is not None and r.reward is not None:
                    if len(r.features) != 4 * self.head.in_features:
                        raise ValueError(f"rollout {r.rollout_id} has {len(r.features) // 4} features; the head "
                                         f"takes {self.head.in_features}")
                    feats.append(r.features)
                    labels.append(1.0 if r.reward >= 0.5 else 0.0)
        cap = len(self._y)
        for x, y in zip(decode_features(feats[-cap:]), labels[-cap:]):
            i = self._added % cap
            self._x[i], self._y[i] = x, y
            self._added += 1
        return len(feats)

    def learn(self, groups: list[Group]) -> dict:
        """One round on a batch: its labels queued, then `train`."""
        added = self.add(groups)
        return {**self.train(), "head_new_labels": added}

    def train(self) -> dict:
        """`head_updates` Adam steps on minibatches from the replay window."""
        feats, labels = self.replay()
        if not len(labels):
            return {"head_loss": math.nan, "head_train_acc": math.nan, "head_replay": 0}
        self.head.train()
        loss_sum = 0.0
        for _ in range(self.cfg.head_updates):
            idx = torch.randint(len(labels), (min(self.cfg.head_batch, len(labels)),), generator=self._gen)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self.head(feats[idx]), labels[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            loss_sum += loss.item()
        self.head.eval()
        with torch.no_grad():
            acc = float(((self.head(feats) >= 0) == (labels >= 0.5)).float().mean())
        return {"head_loss": loss_sum / self.cfg.head_updates, "head_train_acc": acc, "head_replay": len(labels)}

    # --- checkpoints ---

    def state_dict(self) -> dict:
        """Everything the head's training needs to go on: weights, optimizer, replay, sampler."""
        return {"head": self.head.state_dict(), "opt": self.opt.state_dict(), "x": self._x, "y": self._y,
                "added": self._added, "gen": self._gen.get_state()}

    def check_state(self, state: dict, where) -> None:
        """ValueError if `state` (from `where`) is another head's shape."""
        got = {k: tuple(v.shape) for k, v in state["head"].items()} | {"replay": tuple(state["x"].shape)}
        want = {k: tuple(v.shape) for k, v in self.head.state_dict().items()} | {"replay": tuple(self._x.shape)}
        if got != want:
            raise ValueError(f"checkpoint {where}: quality head shapes {got}, this learner's {want} "
                             "(pruner.head_hidden, pruner.head_replay, the model's hidden size)")

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["opt"])
        self._x.copy_(state["x"])
        self._y.copy_(state["y"])
        self._added = int(state["added"])
        self._gen.set_state(state["gen"])
