"""`stream-rl learner`: the learner as a process of its own.

Rank 0 takes `TrainBatch`es from the controller over ZMQ, hands each to the
other ranks (torchrun, data parallel), updates the policy and the quality
head, and stages the new weights for the generators when asked (the weight
sender's transfer goes straight to the generators' workers; the controller
only relays the URI). It reports `StepDone`, with the update's metrics.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from stream_rl.config import Config
from stream_rl.learner.checkpoint import FINAL_HEAD_FILE, find_checkpoint, load_checkpoint, save_checkpoint
from stream_rl.learner.distributed import broadcast_batch, init_from_env
from stream_rl.learner.distributed import close as close_distributed
from stream_rl.learner.samples import samples_from_groups
from stream_rl.learner.trainer import Learner
from stream_rl.protocol import (CheckpointSaved, Decoder, LearnerFailed, LearnerReady, Receivers, SaveCheckpoint,
                                Shutdown, StepDone, SyncWeights, ToLearner, TrainBatch, WeightsLoaded, WeightsStaged)
from stream_rl.transport import ZmqChannel, caps
from stream_rl.weights_sync import make_weight_sender

log = logging.getLogger(__name__)


def group_abs_advantage(groups, samples) -> dict[str, float]:
    """Each group's mean |advantage| over its trained samples (0 if none)."""
    adv: dict[str, list[float]] = {}
    for s in samples:
        adv.setdefault(s.group_id, []).append(abs(s.advantage))
    return {g.group_id: sum(adv[g.group_id]) / len(adv[g.group_id]) if g.group_id in adv else 0.0 for g in groups}


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
        self.version = 0  # the version of the weights last staged
        self.resumed = None
        if resume is not None:
            self.resumed = load_checkpoint(find_checkpoint(resume), self.learner)
            self.version = self.resumed["version"]
        self.sender = make_weight_sender(cfg, self.out)
        cap, batch_cap = caps(cfg)
        self.inbox = ZmqChannel(cfg.learner.addr, send=False, bind=True, hwm=cfg.generator.hwm, cap=batch_cap,
                                decoder=Decoder(ToLearner, cfg.run.id))
        self.outbox = ZmqChannel(cfg.learner.reply_addr, send=True, bind=False, hwm=cfg.generator.hwm,
                                 run=cfg.run.id, cap=cap)

    def stage(self, version: int, receivers: Receivers | None) -> WeightsStaged:
        uri = self.sender.stage(self.learner.weights_for_sync(), version, receivers)
        self.version = version
        return WeightsStaged(version=version, uri=uri, receivers=receivers)

    def train(self, msg: TrainBatch) -> StepDone:
        lc = self.cfg.learner
        t0 = time.perf_counter()
        batch = samples_from_groups(msg.groups, lc.adv_eps, lc.drop_zero_variance_groups, lc.mask_truncated,
                                    correction=lc.pruning_correction, scale=self.cfg.adv_std)
        for why in batch.rejected:  # the rest of the batch trains
            log.warning("left out of the update: %s", why)
        broadcast_batch([batch.samples, self.version, batch.members])  # to the other ranks, if any
        stats = self.learner.step(batch.samples, policy_version=self.version, members=batch.members)
        stats.update(self.learner.train_head(msg.groups))
        stats.update(train_s=time.perf_counter() - t0, tokens_trained=sum(len(s.response_ids) for s in batch.samples),
                     groups_dropped=batch.dropped_groups, samples_rejected=len(batch.rejected))
        every = self.cfg.run.snapshot_every
        if every and msg.step % every == 0:  # the step of metrics.jsonl
            self.learner.model.save_pretrained(snapshot_path(self.out, msg.step))
        weights = None
        if msg.sync_version is not None:
            t1 = time.perf_counter()
            weights = self.stage(msg.sync_version, msg.receivers)
            stats["stage_s"] = time.perf_counter() - t1
        return StepDone(step=msg.step, stats=stats, weights=weights,
                        group_abs_advantage=group_abs_advantage(msg.groups, batch.samples))

    def run(self) -> int:
        """Serve until `Shutdown`; returns the updates done."""
        self.outbox.send(LearnerReady(ranks=self.world, step=self.resumed["step"] if self.resumed else 0,
                                      needs_sync=self.learner.head_trainer is not None or self.resumed is not None))
        try:
            while True:
                if self.handle(self.inbox.recv()):
                    return self.learner.steps
        except BaseException as err:
            self.outbox.send(LearnerFailed(error=f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=8)}"))
            raise
        finally:
            self.sender.close()
            self.inbox.close()
            self.outbox.close()

    def handle(self, msg) -> bool:
        """Act on one message; True once told to stop."""
        if isinstance(msg, TrainBatch):
            self.outbox.send(self.train(msg))
        elif isinstance(msg, SyncWeights):
            self.outbox.send(self.stage(msg.version, msg.receivers))
        elif isinstance(msg, WeightsLoaded):
            self.sender.release(msg.version)
        elif isinstance(msg, SaveCheckpoint):
            save_checkpoint(msg.path, self.learner, step=msg.step, version=msg.version)
            self.outbox.send(CheckpointSaved(path=msg.path, step=msg.step))
        elif isinstance(msg, Shutdown):
            self.save_final()
            return True
        return False

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
