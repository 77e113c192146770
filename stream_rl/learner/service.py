"""`stream-rl learner`: the learner as a process of its own.

Rank 0 is one loop over a `RolloutSource` (the learner's end of the
controller's protocol, the API any other learner uses too): each batch goes
to the other ranks (torchrun, data parallel), updates the policy, and the
weights after it go back to the source, which stages them for the
generators when a sync is due (the weight sender's transfer goes straight
to the generators' workers; the controller only relays the URI).
"""

from __future__ import annotations

import time
from pathlib import Path

from stream_rl.config import Config
from stream_rl.learner.checkpoint import FINAL_HEAD_FILE, find_checkpoint, load_checkpoint, save_checkpoint
from stream_rl.learner.distributed import broadcast_batch, init_from_env
from stream_rl.learner.distributed import close as close_distributed
from stream_rl.learner.source import RolloutBatch, RolloutSource
from stream_rl.learner.trainer import Learner


def snapshot_path(out: Path, steps: int) -> Path:
    """Where `run.snapshot_every` puts the policy after `steps` updates."""
    return Path(out) / "snapshots" / f"step_{steps:05d}"


class LearnerService:
    def __init__(self, cfg: Config, out_dir: str | Path, world: int = 1, resume: str | Path | None = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.world = world
        self.learner = Learner(cfg, 0, world)
        resumed = None
        if resume is not None:
            resumed = load_checkpoint(find_checkpoint(resume), self.learner)
        self.source = RolloutSource(cfg, self.out, launch=False, head=self.learner.head_trainer, ranks=world,
                                    resumed=resumed, on_checkpoint=self.save_checkpoint)
        self.source.weights = self.learner.model  # what a sync stages: its live tensors
        self.sender = self.source.sender

    def train(self, batch: RolloutBatch) -> dict:
        """One update on `batch`; its metrics."""
        t0 = time.perf_counter()
        broadcast_batch([batch.samples, batch.policy_version, batch.members])  # to the other ranks, if any
        stats = self.learner.step(batch.samples, policy_version=batch.policy_version, members=batch.members)
        stats["train_s"] = time.perf_counter() - t0
        every = self.cfg.run.snapshot_every
        if every and batch.step % every == 0:  # the step of metrics.jsonl
            self.learner.model.save_pretrained(snapshot_path(self.out, batch.step))
        return stats

    def run(self) -> int:
        """Serve until the controller says `Shutdown`; returns the updates done."""
        with self.source as source:
            for batch in source:
                source.update_weights(self.learner.model, stats=self.train(batch))
        self.save_final()
        return self.learner.steps

    def save_checkpoint(self, path: Path, step: int) -> None:
        save_checkpoint(path, self.learner, step=step, version=self.source.version)

    def save_final(self) -> None:
        from transformers import AutoTokenizer

        final = self.out / "final_model"
        self.learner.model.save_pretrained(final)
        AutoTokenizer.from_pretrained(self.cfg.model.path,
                                      trust_remote_code=self.cfg.model.trust_remote_code).save_pretrained(final)
        ht = self.learner.head_trainer
        if ht is not None:
            # The quality head beside the policy, for `stream-rl eval`: its state
            # dict under "head", as in a checkpoint's head.pt, with the L_detect it
            # was trained at. A .pt file, not .safetensors: vLLM would load every
            # *.safetensors of the directory as the model's weights.
            import torch

            torch.save({"head": ht.head.state_dict(), "l_detect": self.cfg.pruner.l_detect}, final / FINAL_HEAD_FILE)


def follow(cfg: Config, rank: int, world: int, resume: str | Path | None = None) -> int:
    """A rank other than 0: updates on rank 0's batches until told to stop."""
    learner = Learner(cfg, rank, world)
    if resume is not None:
        load_checkpoint(find_checkpoint(resume), learner)
    while (msg := broadcast_batch(None)) is not None:
        samples, version, members = msg
        learner.step(samples, policy_version=version, members=members)
    return learner.steps


def serve(cfg: Config, out_dir: str | Path, resume: str | Path | None = None) -> int:
    """Run this process's learner rank (torchrun sets the rank and world)."""
    if cfg.learner.threads:
        import torch

        torch.set_num_threads(cfg.learner.threads)
    rank, world = init_from_env(cfg.learner.device)
    try:
        if rank > 0:
            return follow(cfg, rank, world, resume)
        try:
            return LearnerService(cfg, out_dir, world, resume).run()
        finally:
            broadcast_batch(None)  # releases the other ranks, also after a failure
    finally:
        close_distributed()
