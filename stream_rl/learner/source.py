"""`RolloutSource`: a stream_rl job's rollouts for any learner.

The learner's end of the controller's protocol, as a Python iterator: it
yields each update's group-complete batch (token ids, rewards, the rollout
log-prob and policy version of every token, inclusion probabilities, group
ids and advantages under the configured estimator) and takes the weights
after the update, which it checks whole and stages through the configured
weight-sync backend. The built-in learner (`learner/service.py`) is one
loop over it, so every `stream-rl train` runs this code.

With `launch=True` it also starts the job's other roles: `stream-rl train
--external-learner` (generators, controller) as a child process; otherwise
it serves a controller started elsewhere (`stream-rl controller`, the Ray
launcher). docs/own-learner.md is the guide.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

from stream_rl.config import Config, load_config
from stream_rl.learner.checkpoint import CONTROLLER_FILE, HEAD_FILE, find_checkpoint, save_own_learner_part
from stream_rl.learner.correction import loss_normalisers, pruning_weights
from stream_rl.learner.policy_weights import PolicyWeights
from stream_rl.learner.samples import Sample, samples_from_groups
from stream_rl.learner.trainer import pad_batch
from stream_rl.codec import Decoder
from stream_rl.protocol import (CheckpointSaved, Group, LearnerFailed, LearnerReady, Receivers, SaveCheckpoint,
                                Shutdown, StepDone, SyncWeights, ToLearner, TrainBatch, WeightsLoaded, WeightsStaged)
from stream_rl.roles import died, start_role, stop_roles
from stream_rl.transport import ZmqChannel, caps
from stream_rl.weights_sync import make_weight_sender

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """The job behind the source failed or stopped answering."""


@dataclass
class RolloutBatch:
    """One update's rollouts: complete groups, rewarded, after pruning."""

    step: int  # the job's step (metrics.jsonl's)
    samples: list[Sample]  # the rollouts to train on, with their group advantages
    groups: list[Group]  # every member as generated, the pruned ones included (audits)
    members: int  # members before pruning of the groups trained: the Horvitz–Thompson N
    correction: str  # learner.pruning_correction
    # The version the weights after this update serve as (None: no sync due
    # this step, weights_sync.every_steps), and the version of the weights
    # the learner holds now: a token's lag is policy_version - its version.
    sync_version: int | None
    policy_version: int
    dropped_groups: int = 0  # zero-variance groups left out (learner.drop_zero_variance_groups)
    rejected: list[str] = field(default_factory=list)  # why each malformed rollout was left out
    stats: dict = field(default_factory=dict)  # what the source measured, sent with the update's
    receivers: Receivers | None = None  # the generators weights staged now go to
    sync_due: bool = False
    next_version: int | None = None  # the least version new weights may take

    def seq_weights(self) -> list[float]:
        """Each sample's loss weight for the pruning correction: 1/inclusion
        under `ht`, 1 under `none` (docs/pruning-correction.md)."""
        return pruning_weights(self.samples, self.correction)

    def normalisers(self, token_budget: int | None = None) -> tuple[float, float]:
        """(sequences, tokens) that divide the batch's summed loss terms: under
        `ht` the members before pruning and the Horvitz–Thompson token count,
        so that the pruned batch's loss estimates the unpruned one's."""
        return loss_normalisers(self.samples, self.correction, members=self.members, token_budget=token_budget)

    def to_tensors(self, pad_id: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The batch as right-padded tensors, for a causal LM's
        `logits[:, :-1]` (position t predicts token t+1):
        `input_ids`, `attention_mask` [B, T]; `response_mask` [B, T-1] (the
        next token is a response token), `rollout_logprobs` and `versions`
        [B, T-1] at those positions (0 and -1 elsewhere; no log-probs when the
        engine returned none); `advantages`, `rewards`, `inclusion`,
        `seq_weights` [B]; `group_index` [B] (into the batch's group ids)."""
        s = self.samples
        if not s:
            return {}
        ids, attn, mask = pad_batch(s, pad_id)
        group_of = {g: i for i, g in enumerate(dict.fromkeys(x.group_id for x in s))}
        out = {"input_ids": ids, "attention_mask": attn, "response_mask": mask,
               "versions": torch.full(mask.shape, -1, dtype=torch.long).masked_scatter(
                   mask, torch.tensor([v for x in s for v in x.versions], dtype=torch.long)),
               "advantages": torch.tensor([x.advantage for x in s]),
               "rewards": torch.tensor([x.reward for x in s]),
               "inclusion": torch.tensor([x.inclusion for x in s]),
               "seq_weights": torch.tensor(self.seq_weights()),
               "group_index": torch.tensor([group_of[x.group_id] for x in s])}
        if all(x.rollout_logprobs is not None for x in s):
            out["rollout_logprobs"] = torch.zeros(mask.shape).masked_scatter(
                mask, torch.tensor([v for x in s for v in x.rollout_logprobs]))
        return {k: v.to(device) for k, v in out.items()}


def _numbers(stats: dict) -> dict:
    """Metrics as the wire carries them: plain numbers (a 0-d tensor too)."""
    out = {}
    for k, v in stats.items():
        try:
            out[str(k)] = v if isinstance(v, (int, float)) else float(v)
        except (TypeError, ValueError):
            raise TypeError(f"stats[{k!r}]: expected a number, got {type(v).__name__}") from None
    return out


class RolloutSource:
    """Group-complete batches from a stream_rl job; new weights back.

    ```
    with RolloutSource("configs/tiny.yaml", "runs/mine") as source:
        for batch in source:
            ...  # train on batch.samples / batch.to_tensors()
            source.update_weights(model, stats={"loss": loss})
    ```
    `cfg`: a Config or a YAML path. `weights`: what the generators serve
    first when it is not `model.path` (a module, a state dict or a Hugging
    Face directory). `launch`: start the generators and the controller
    (`stream-rl train --external-learner`, log in OUT/controller.log) for
    `max_steps` updates; False: serve a controller started elsewhere.
    `on_checkpoint(path, step)`: the controller checkpoints the job
    (`run.checkpoint_every`): save your learner's state under `path`.
    `resume`: continue the job from its newest checkpoint in OUT
    (`resumed_from`: load your state from there before the first batch).
    `head`, `ranks`, `resumed` are the built-in learner's (its quality head,
    its torchrun ranks, the {step, version} it resumed at).
    """

    def __init__(self, cfg: Config | str | Path, out_dir: str | Path | None = None, *, weights=None,
                 launch: bool = True, max_steps: int | None = None, on_checkpoint=None, resume: bool = False,
                 head=None, ranks: int = 1, resumed: dict | None = None):
        cfg = cfg if isinstance(cfg, Config) else load_config(cfg)
        if launch and not cfg.run.id:  # the job's id on the wire: both ends must know it
            cfg = msgspec.structs.replace(cfg, run=msgspec.structs.replace(cfg.run, id=secrets.token_hex(4)))
        self.cfg = cfg
        self.out = Path(out_dir or cfg.run.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.policy = PolicyWeights(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code)
        self.own_head = head is None and cfg.pruner.mode == "arrol"
        if self.own_head:  # ARRoL's quality head trains here for any learner
            from stream_rl.learner.quality_head import QualityHeadTrainer

            head = QualityHeadTrainer(self.policy.hidden_size, cfg.pruner, cfg.run.seed)
        self.head = head
        self.resumed_from = None  # the job checkpoint resumed from: your learner's state is where you saved it
        if resume:
            self.resumed_from = find_checkpoint(self.out / "checkpoint")
            state = json.loads((self.resumed_from / CONTROLLER_FILE).read_text())
            resumed = {"step": state["step"], "version": state["staged"]}
            if self.own_head:
                saved = torch.load(self.resumed_from / HEAD_FILE, map_location="cpu", weights_only=True)
                head.check_state(saved, self.resumed_from)
                head.load_state_dict(saved)
        self.on_checkpoint = on_checkpoint
        self.weights = weights if weights is not None else cfg.model.path  # what a sync stages
        if weights is not None:
            self.policy.check(weights)  # a bad start fails here, not at the first sync
        self.version = resumed["version"] if resumed else 0  # the version of the weights last staged
        self.open: RolloutBatch | None = None  # handed out, its update not reported yet
        self.finished = False  # the controller said Shutdown
        self.proc = None
        self.sender = make_weight_sender(cfg, self.out)
        cap, batch_cap = caps(cfg)
        lc = cfg.learner
        self.inbox = ZmqChannel(lc.addr, send=False, bind=True, hwm=cfg.generator.hwm, cap=batch_cap,
                                decoder=Decoder(ToLearner, cfg.run.id))
        self.outbox = ZmqChannel(lc.reply_addr, send=True, bind=False, hwm=cfg.generator.hwm, run=cfg.run.id, cap=cap)
        self.own_cores = None
        if launch:
            path = self.out / "source_config.json"
            path.write_bytes(msgspec.json.encode(cfg))
            cmd = ["-m", "stream_rl", "train", "--config", str(path), "--out", str(self.out), "--external-learner"]
            if max_steps is not None:
                cmd += ["--max-steps", str(max_steps)]
            if resume:
                cmd += ["--resume"]
            self.log_path = self.out / "controller.log"
            self.proc, self._log = start_role(cmd, self.log_path)
            from stream_rl.placement import allowed_cores, for_job, pin

            placement = for_job(cfg)  # after the start: the job places its engines on every core we have
            if placement is not None:  # this learner shares the controller's cores, as the built-in one does
                self.own_cores = allowed_cores(), torch.get_num_threads()
                pin(placement.rest)
                # torch sized its thread pool for every core: more threads than
                # cores spin against each other (a 10x slower update, measured).
                torch.set_num_threads(cfg.learner.threads or len(placement.rest))
        self.outbox.send(LearnerReady(ranks=ranks, step=resumed["step"] if resumed else 0,
                                      needs_sync=weights is not None or head is not None or resumed is not None))

    # --- batches ---------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> RolloutBatch:
        if self.open is not None:  # its update reported without new weights
            self.update_weights(None)
        while not self.finished:
            msg = self._recv()
            if isinstance(msg, TrainBatch):
                return self._batch(msg)
            if isinstance(msg, SyncWeights):
                self.outbox.send(self._stage(self.policy.check(self.weights), msg.version, msg.receivers))
            elif isinstance(msg, WeightsLoaded):
                self.sender.release(msg.version)
            elif isinstance(msg, SaveCheckpoint):
                self._checkpoint(msg)
            elif isinstance(msg, Shutdown):
                self.finished = True
        raise StopIteration

    def _recv(self):
        """The controller's next message; its death (a launched job) raised."""
        while True:
            if self.inbox.sock.poll(1000):
                self._t_msg = time.perf_counter()  # decoding counts in the source's time
                msg = self.inbox.recv(0)
                if msg is not None:
                    return msg
            elif self.proc is not None and self.proc.poll() is not None:
                raise SourceError(died("the job (controller and generators)", self.proc, self.log_path))

    def _batch(self, msg: TrainBatch) -> RolloutBatch:
        lc = self.cfg.learner
        t0 = self._t_msg
        got = samples_from_groups(msg.groups, lc.adv_eps, lc.drop_zero_variance_groups, lc.mask_truncated,
                                  correction=lc.pruning_correction, scale=self.cfg.adv_std)
        for why in got.rejected:  # the rest of the batch trains
            log.warning("left out of the update: %s", why)
        stats = {"tokens_trained": sum(len(s.response_ids) for s in got.samples),
                 "groups_dropped": got.dropped_groups, "samples_rejected": len(got.rejected)}
        t1 = time.perf_counter()
        if self.head is not None:
            stats.update(self.head.learn(msg.groups))
        stats["head_s"] = time.perf_counter() - t1
        stats["source_s"] = t1 - t0
        due = msg.sync_due and msg.sync_version is not None
        self.open = RolloutBatch(step=msg.step, samples=got.samples, groups=msg.groups, members=got.members,
                                 correction=lc.pruning_correction, sync_version=msg.sync_version if due else None,
                                 policy_version=self.version, dropped_groups=got.dropped_groups,
                                 rejected=got.rejected, stats=stats, receivers=msg.receivers, sync_due=due,
                                 next_version=msg.sync_version)
        self._t_out = time.perf_counter()
        return self.open

    # --- weights back ----------------------------------------------------------------------

    def update_weights(self, weights, *, version: int | None = None, stats: dict | None = None) -> int | None:
        """Report the open batch's update: `weights` are the learner's after
        it (a module or a state dict of its live tensors follow it; a
        Hugging Face directory is read when staged; None: unchanged), `stats`
        its metrics (numbers; they go to metrics.jsonl). The weights are
        checked whole first (ValueError, nothing sent, the batch still open).

        When the batch's sync is due, or `version` is given (at least the
        batch's `next_version`), they are staged now as that version and the
        generators load them in flight; returns the version, else None (they
        go with the next due sync)."""
        batch = self.open
        if batch is None:
            raise RuntimeError("update_weights: no batch is open (call it once per batch, before the next)")
        t0 = time.perf_counter()
        extra = {"learner_s": t0 - self._t_out, **_numbers(stats or {})}
        if weights is not None:
            checked = self.policy.check(weights)
            self.weights = weights
        stage = batch.sync_due or version is not None
        if version is not None and (batch.next_version is None or version < batch.next_version):
            raise ValueError(f"version {version}: new weights need a version of at least {batch.next_version} "
                             "(the generators may serve the one before)")
        staged = None
        if stage:
            if weights is None:
                checked = self.policy.check(self.weights)
            t1 = time.perf_counter()
            v = version if version is not None else batch.sync_version
            staged = self._stage(checked, v, batch.receivers)
            extra["stage_s"] = time.perf_counter() - t1
        batch.stats["source_s"] += time.perf_counter() - t0 - extra.get("stage_s", 0.0)
        self.open = None
        self.outbox.send(StepDone(step=batch.step, stats={**batch.stats, **extra}, weights=staged,
                                  group_abs_advantage=group_abs_advantage(batch.groups, batch.samples)))
        return staged.version if staged is not None else None

    def _stage(self, checked: dict[str, torch.Tensor], version: int, receivers: Receivers | None) -> WeightsStaged:
        if self.head is not None:  # the quality head goes with the policy
            checked = {**checked, **self.head.head.named_for_sync()}
        uri = self.sender.stage(checked, version, receivers)
        self.version = version
        return WeightsStaged(version=version, uri=uri, receivers=receivers)

    def _checkpoint(self, msg: SaveCheckpoint) -> None:
        path = Path(msg.path)
        path.mkdir(parents=True, exist_ok=True)
        if self.own_head:  # the built-in learner's checkpoint holds its head
            torch.save(self.head.state_dict(), path / HEAD_FILE)
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, msg.step)
        if not (path / "meta.json").exists():  # the built-in learner's `save_checkpoint` wrote its own
            save_own_learner_part(path, self.cfg, step=msg.step, version=msg.version, has_head=self.head is not None)
        self.outbox.send(CheckpointSaved(path=msg.path, step=msg.step))

    # --- the end ---------------------------------------------------------------------------

    def __enter__(self) -> RolloutSource:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if err is not None and not self.finished:  # the controller stops now, not after learner.step_timeout_s
            self.fail(err)
        self.close()

    def fail(self, err: BaseException) -> None:
        """Tell the controller this learner failed (it stops the job)."""
        self.outbox.send(LearnerFailed(error=f"{type(err).__name__}: {err}\n"
                                             f"{''.join(traceback.format_exception(err, limit=8))}"))

    def close(self, timeout_s: float = 120.0) -> None:
        """Release the sockets and the staged weights; a launched job that
        still runs is stopped (SIGTERM: it stops every role it started)."""
        if self.proc is not None:
            if self.finished:
                try:
                    self.proc.wait(timeout_s)
                except Exception:
                    pass
            stop_roles([(self.proc, self.proc.terminate, 60.0)])
            self._log.close()
            self.proc = None
        if self.own_cores is not None:
            from stream_rl.placement import pin

            cores, threads = self.own_cores
            pin(cores)
            torch.set_num_threads(threads)
            self.own_cores = None
        self.sender.close()
        self.inbox.close()
        self.outbox.close(linger_ms=2000)


def group_abs_advantage(groups, samples) -> dict[str, float]:
    """Each group's mean |advantage| over its trained samples (0 if none):
    DPPO's prompt history, for the controller's prompt sampler."""
    adv: dict[str, list[float]] = {}
    for s in samples:
        adv.setdefault(s.group_id, []).append(abs(s.advantage))
    return {g.group_id: sum(adv[g.group_id]) / len(adv[g.group_id]) if g.group_id in adv else 0.0 for g in groups}
