"""`stream-rl train`: rollouts -> learner -> weight sync, step after step."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import msgspec
import torch

from stream_rl.config import Config
from stream_rl.controller import RolloutController
from stream_rl.data import DppoPromptSampler, PromptDataset, PromptSampler
from stream_rl.generator.client import GeneratorClient, GeneratorProcess
from stream_rl.learner.checkpoint import save_checkpoint
from stream_rl.learner.distributed import broadcast_batch, init_from_env
from stream_rl.learner.distributed import close as close_distributed
from stream_rl.learner.trainer import Learner, samples_from_groups
from stream_rl.metrics import MetricsLogger
from stream_rl.pruner.base import make_pruner
from stream_rl.pruner.quality import inclusion_weighted_mean
from stream_rl.verifier import make_verifier
from stream_rl.weights_sync import make_weight_sender

log = logging.getLogger(__name__)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def summarize(records: list[dict]) -> dict:
    """Reward of the first and last 20% of steps, and run totals."""
    n = len(records)
    k = max(1, n // 5)
    first = _mean(r["reward_policy_mean"] for r in records[:k])
    last = _mean(r["reward_policy_mean"] for r in records[-k:])
    return {
        "steps": n,
        "policy_version": records[-1]["policy_version"] if records else 0,
        "reward_first_20pct": first,
        "reward_last_20pct": last,
        "reward_rise": last - first,
        "tokens_generated": sum(r["tokens_generated"] for r in records),
        "tokens_trained": sum(r["tokens_trained"] for r in records),
        "wall_s": records[-1]["wall_s"] if records else 0.0,
    }


def train(cfg: Config, out_dir: str | Path | None = None, max_steps: int | None = None,
          generator: GeneratorClient | None = None) -> dict:
    """Run the job; `generator` reuses a running generator (tests share one
    engine) instead of starting one. Its weights must be cfg.model.path's.

    Under torchrun, rank 0 runs the whole job and the other ranks only join
    the learner's updates (data parallel): rank 0 broadcasts each batch."""
    rank, world = init_from_env(cfg.learner.device)
    if rank > 0:
        return _follow(cfg, rank, world)
    try:
        return _train(cfg, out_dir, max_steps, generator, world)
    finally:
        broadcast_batch(None)  # releases the other ranks, also after a failure
        close_distributed()


def _follow(cfg: Config, rank: int, world: int) -> dict:
    """A learner rank other than 0: updates on rank 0's batches until told to stop."""
    learner = Learner(cfg, rank, world)
    steps = 0
    try:
        while (msg := broadcast_batch(None)) is not None:
            samples, version = msg
            learner.step(samples, policy_version=version)
            steps += 1
    finally:
        close_distributed()
    return {"rank": rank, "steps": steps}


def _train(cfg: Config, out_dir, max_steps, generator, world: int) -> dict:
    from transformers import AutoTokenizer

    out = Path(out_dir or cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_bytes(msgspec.json.format(msgspec.json.encode(cfg)))
    (out / "metrics.jsonl").unlink(missing_ok=True)
    steps = max_steps or cfg.run.max_steps
    torch.manual_seed(cfg.run.seed)
    t_start = time.time()

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    dataset = PromptDataset.load(cfg.data, tokenizer)
    log.info("loaded %d prompts from %s (%d set aside as too long)", len(dataset.rows), dataset.source,
             len(dataset.overlong))
    verifier = make_verifier(cfg.data)
    learner = Learner(cfg, 0, world)
    sender = make_weight_sender(cfg, out)
    def sync_weights() -> None:
        version = generator.version + 1  # versions are monotonic
        uri = sender.stage(learner.weights_for_sync(), version)
        generator.update_weights(version, uri)
        sender.release(version)

    owned = generator is None
    if owned:
        generator = GeneratorProcess(cfg, out)
    if not owned or learner.head_trainer is not None:
        # A running generator may serve other weights, and a fresh one has
        # no quality head yet: start from ours.
        sync_weights()
    log.info("generator ready after %.1f s", time.time() - t_start)
    sampler = PromptSampler(dataset, cfg.data.shuffle, cfg.run.seed)
    if cfg.data.dppo_prompt_rate > 0:
        sampler = DppoPromptSampler(sampler, cfg.data.dppo_prompt_rate, cfg.run.seed)
    controller = RolloutController(cfg, generator, sampler,
                                   tokenizer, verifier, make_pruner(cfg))
    metrics = MetricsLogger(out, steps, cfg.run.progress)
    records: list[dict] = []
    t0 = time.time()
    try:
        for step in range(1, steps + 1):
            ts = time.perf_counter()
            groups, gstats = controller.collect(cfg.generator.target_groups)
            rewards = [r for g in groups for r in g.rewards]
            kept = [r for g in groups for r in g.survivors if r.reward is not None]
            batch = samples_from_groups(groups, cfg.learner.adv_eps, cfg.learner.drop_zero_variance_groups,
                                        cfg.learner.mask_truncated)
            # Versions the learner's batch lags the policy it updates.
            versions = [v for g in groups for r in g.survivors for v in r.versions]
            lag_max = generator.version - min(versions) if versions else 0
            useful = sum(g.num_tokens for g in groups)
            tt = time.perf_counter()
            samples = batch.samples
            if isinstance(sampler, DppoPromptSampler):
                # History score: the group's mean |A| (0 for a zero-variance group left out).
                adv: dict[str, list[float]] = {}
                for s in samples:
                    adv.setdefault(s.group_id, []).append(abs(s.advantage))
                for g in groups:
                    a = adv.get(g.group_id, [0.0])
                    sampler.record(g.rollouts[0].prompt_ids, sum(a) / len(a))
            for why in batch.rejected:  # the rest of the batch trains
                log.warning("left out of the update: %s", why)
            broadcast_batch([samples, generator.version])  # to the other learner ranks, if any
            lstats = learner.step(samples, policy_version=generator.version)
            lstats.update(learner.train_head(groups))
            train_s = time.perf_counter() - tt
            sync_s = 0.0
            if step % cfg.weights_sync.every_steps == 0 or step == steps:
                tw = time.perf_counter()
                sync_weights()
                sync_s = time.perf_counter() - tw
            rec = {
                "step": step,
                "policy_version": generator.version,
                "reward_mean": _mean(rewards),
                # The policy's, not the survivors': pruning may bias the kept set.
                "reward_policy_mean": inclusion_weighted_mean([r.reward for r in kept], [r.keep_prob for r in kept]),
                "groups": len(groups),
                "zero_variance_groups": sum(len(set(g.rewards)) == 1 for g in groups),
                "groups_dropped": batch.dropped_groups,
                "samples_rejected": len(batch.rejected),
                "dppo_prompts_skipped": getattr(sampler, "skipped", 0),
                "tokens_generated": gstats.tokens_generated,
                "tokens_in_batch": useful,
                "gen_tokens_per_s": useful / gstats.seconds if gstats.seconds else 0.0,
                "requests_in_flight_mean": gstats.mean_in_flight,
                "aborted_at_step_end": gstats.aborted,
                "partials_continued": gstats.buffer["partials_continued"],
                "stale_restarted": gstats.buffer["stale_restarted"],
                "stale_dropped_groups": gstats.buffer["stale_dropped_groups"],
                "tokens_discarded": gstats.buffer["tokens_discarded"],
                "open_groups": controller.buffer.num_open_groups,
                "tokens_trained": sum(len(s.response_ids) for s in samples),
                "response_len_mean": _mean(gstats.response_lens),
                "truncated_frac": gstats.truncated / max(1, gstats.rollouts_finished),
                "rejected_requests": gstats.rejected,
                "pruned_groups_dropped": gstats.pruned_groups_dropped,
                "tokens_per_kept_rollout": gstats.tokens_generated / max(1, sum(len(g.survivors) for g in groups)),
                **{f"prune/{k}": v for k, v in gstats.pruner.items()},
                "version_lag_max": lag_max,
                "gen_s": gstats.seconds,
                "train_s": train_s,
                "sync_s": sync_s,
                "step_s": time.perf_counter() - ts,
                "wall_s": time.time() - t0,
                **lstats,
            }
            records.append(rec)
            metrics.log(rec)
            if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 and step < steps:
                save_checkpoint(out / "checkpoint", learner, step=step, version=generator.version,
                                pruner=controller.pruner)
        # Partials left in the buffer are kept, with their last tokens, for a
        # later run to continue (resume).
        controller.drain()
        controller.buffer.save(out / "buffer.msgpack")
        save_checkpoint(out / "checkpoint", learner, step=len(records), version=generator.version,
                        pruner=controller.pruner)
    finally:
        metrics.close()
        sender.close()
        if owned:
            generator.stop()
    summary = summarize(records)
    summary["startup_s"] = t0 - t_start
    summary["step_s_median"] = statistics.median(r["step_s"] for r in records) if records else 0.0
    summary.update({f"prune/{k}": v for k, v in controller.pruner.summary().items()})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    learner.model.save_pretrained(out / "final_model")
    tokenizer.save_pretrained(out / "final_model")
    return summary
