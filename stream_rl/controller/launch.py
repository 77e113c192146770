"""`stream-rl train` and `stream-rl controller`: start or reach the roles,
then run the job (`controller/job.py`) on its schedule
(`controller/schedules.py`).

The controller (this process) owns the generators' streams, the pruner and
the recycling buffer; complete groups go to the learner process as
`TrainBatch`es, and the weights it stages go to the generators as
`UpdateWeights`.
"""

from __future__ import annotations

import gc
import json
import logging
import secrets
import statistics
import time
from pathlib import Path

import msgspec

from stream_rl.config import Config
from stream_rl.controller.job import Job
from stream_rl.controller.schedules import run_stream, run_sync
from stream_rl.generator.client import GeneratorClient, GeneratorProcess
from stream_rl.generator.pool import GeneratorPool
from stream_rl.learner.checkpoint import find_checkpoint
from stream_rl.learner.client import LearnerClient, LearnerError, LearnerProcess
from stream_rl.metrics import MetricsLogger, summarize
from stream_rl.placement import allowed_cores, for_job, pin
from stream_rl.preflight import CheckedJob, check_job
from stream_rl.protocol import Hello, LearnerReady, Shutdown
from stream_rl.roles import stop_roles

log = logging.getLogger(__name__)


def train(cfg: Config, out_dir: str | Path | None = None, max_steps: int | None = None,
          generator: GeneratorClient | list[GeneratorClient] | None = None, resume: bool = False,
          external_learner: bool = False) -> dict:
    """Every role on this host: the learner and `generator.count` generator
    processes, and the controller here. `generator` reuses running
    generator(s) instead (tests share one engine); they may serve other
    weights than cfg.model.path's, so the learner's are synced first.
    `resume` continues from the newest complete checkpoint in OUT.
    `external_learner`: start no learner, serve the one at learner.addr
    (a `RolloutSource`, which started this job)."""
    t_start = time.time()
    checked = check_job(cfg)  # before anything starts: errors in seconds, not after the engines load
    owned = generator is None
    if owned and not cfg.run.id:  # a job of its own on the wire (a shared generator keeps its own)
        cfg = msgspec.structs.replace(cfg, run=msgspec.structs.replace(cfg.run, id=secrets.token_hex(4)))
    out = Path(out_dir or cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = find_checkpoint(out / "checkpoint") if resume else None
    # Engines started here get cores of their own (generator.engine_cpus).
    placement = for_job(cfg) if owned else None
    own_cores = allowed_cores()
    if placement is not None:
        log.info("cores: engine(s) %s; front end(s), controller and learner %s", placement.engines, placement.rest)
    learner = (LearnerClient(cfg) if external_learner  # starts while the engines load
               else LearnerProcess(cfg, out, resume=ckpt, cpus=placement and placement.rest))
    gens: list[GeneratorClient] = []
    pool = None
    try:
        if owned:
            def start(i: int) -> GeneratorProcess:
                return GeneratorProcess(cfg, out, index=i, wait=False, placement=placement)

            gens = [start(i) for i in range(cfg.generator.count)]
            if placement is not None:
                pin(placement.rest)
            for g in gens:
                g.wait_ready(cfg.generator.startup_timeout_s)
        else:
            gens = list(generator) if isinstance(generator, list) else [generator]
        ready = learner.wait_ready(cfg.learner.startup_timeout_s)
        pool = make_pool(cfg, gens, start if owned else None)
        return run_controller(cfg, out, pool, learner, ready, max_steps, t_start,
                              fresh_generators=owned, resume_from=ckpt, checked=checked)
    finally:
        if owned:  # the pool's, restarted ones included
            starting = [pool.clients[i] for i in pool.members.in_state("starting")] if pool is not None else []
            stop_job(learner, pool.clients if pool is not None else gens, starting)
        elif isinstance(learner, LearnerProcess):
            learner.stop()
        else:
            tell_roles_to_exit(learner, [])
        if placement is not None:
            pin(own_cores)


# A generator holds nothing to save: past this its engine is killed.
GENERATOR_STOP_S = 3.0


def stop_job(learner: LearnerClient, gens: list[GeneratorProcess], starting: list[GeneratorProcess]) -> None:
    """Every role of this host, side by side: the learner saves its final
    model meanwhile (one this job did not start is told to stop). A
    generator that died, hangs or is still starting (it would not answer)
    is killed first: its engine, left running, is still a rank of the
    weight broadcast the learner may be finishing."""
    lost = [g for g in gens if g.proc.poll() is not None or g.hung or g in starting]
    for g in lost:
        g.kill()
    own = [learner] if isinstance(learner, LearnerProcess) else []
    if not own:
        tell_roles_to_exit(learner, [])
    stop_roles([r.stopping() for r in own] + [g.stopping(GENERATOR_STOP_S) for g in gens if g not in lost])
    for role in own + gens:
        role.release()


def make_pool(cfg: Config, gens: list[GeneratorClient], restart=None) -> GeneratorPool:
    g = cfg.generator
    return GeneratorPool(gens, g.hang_timeout_s, restart, g.max_restarts, g.restart_backoff_s, g.startup_timeout_s)


def reconnect(cfg: Config, i: int) -> GeneratorClient:
    """A generator run elsewhere, lost: fresh sockets (nothing queued for the
    one that went reaches its successor) and a Hello it answers when up."""
    c = GeneratorClient(cfg, i)
    c.requests.send(Hello())
    return c


def connect(cfg: Config, out_dir: str | Path | None = None, max_steps: int | None = None,
               resume: bool = False) -> dict:
    """`stream-rl controller`: the generators and the learner run elsewhere
    (their addresses are in the config); connect, run the job, and tell every
    role to exit when it ends (the learner saves its final model first)."""
    t_start = time.time()
    checked = check_job(cfg)
    out = Path(out_dir or cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = find_checkpoint(out / "checkpoint") if resume else None
    learner = LearnerClient(cfg)
    gens = [GeneratorClient(cfg, i) for i in range(cfg.generator.count)]
    pool = None
    try:
        for g in gens:
            # A generator that is already up (this job resumed) answers with
            # the version it serves; a starting one says so when ready.
            g.requests.send(Hello())
            g.wait_ready(cfg.generator.startup_timeout_s)
        ready = learner.wait_ready(cfg.learner.startup_timeout_s)
        pool = make_pool(cfg, gens, lambda i: reconnect(cfg, i))
        return run_controller(cfg, out, pool, learner, ready, max_steps, t_start,
                              fresh_generators=all(g.version == 0 for g in gens), resume_from=ckpt, checked=checked)
    finally:
        tell_roles_to_exit(learner, pool.clients if pool is not None else gens)


def tell_roles_to_exit(learner: LearnerClient, gens: list[GeneratorClient]) -> None:
    """Shutdown to roles this process did not start (the learner saves its
    final model first); queued messages get a moment to leave before the
    sockets close."""
    learner.send(Shutdown())
    learner.batches.close(linger_ms=5000)
    learner.close()
    for g in gens:
        if g.requests.sock.closed:  # lost for good: nothing to tell it
            continue
        g.requests.send(Shutdown())
        g.requests.close(linger_ms=5000)
        g.close()


def settle_heap() -> None:
    """Keep what lives for the whole job (the imported libraries, the
    dataset, the tokenizer) out of the garbage collector's full passes:
    with thousands of requests in flight a full collection stopped the
    controller, and every stream with it, for 0.3 s, nearly all of it
    walking those (`bench controller`: docs/scaling.md). `unsettle_heap`
    when the job ends."""
    gc.collect()
    gc.freeze()


def unsettle_heap() -> None:
    """Frozen objects are never freed, and native libraries that count
    their objects at exit (triton's nanobind) then print pages of "leaked"
    warnings: hand them back to the collector."""
    gc.unfreeze()


def run_controller(cfg: Config, out: Path, pool: GeneratorPool, learner: LearnerClient, ready: LearnerReady,
                   max_steps: int | None, t_start: float, fresh_generators: bool, checked: CheckedJob,
                   resume_from: Path | None = None) -> dict:
    (out / "config.json").write_bytes(msgspec.json.format(msgspec.json.encode(cfg)))
    steps = max_steps or cfg.run.max_steps
    job = Job(cfg, out, pool, learner, steps, checked)
    if resume_from is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    else:
        step = job.restore(resume_from)
        if ready.step != step:
            raise LearnerError(f"the learner resumed at step {ready.step}, the controller's checkpoint "
                               f"{resume_from} is step {step}: start both from the same checkpoint")
        log.info("resuming after step %d from %s", step, resume_from)
    if ready.needs_sync or not fresh_generators:
        # The generators serve the model path's weights (or others): start
        # from the learner's, with its quality head.
        job.sync_now()
    if job.sparsity.window:  # sparse rollouts from the first step (sparsity.mode=fixed, or no warm-up)
        pool.set_window(job.sparsity.window)
    log.info("%s job ready after %.1f s (%d generator(s), %d learner rank(s))", cfg.mode,
             time.time() - t_start, len(pool.clients), ready.ranks)
    metrics = MetricsLogger(out, steps, cfg.run.progress, cfg, resumed=resume_from is not None)
    settle_heap()
    job.t0 = job.clock.wall() - job.wall_offset
    try:
        (run_stream if cfg.mode == "stream" else run_sync)(job, metrics)
        # Partials left in the buffer are kept, with their last tokens, for a
        # later run to continue (resume).
        job.controller.drain()
        job.controller.buffer.save(out / "buffer.msgpack")
        job.checkpoint(job.records[-1]["step"] if job.records else job.first_step - 1)
    finally:
        metrics.close()
        unsettle_heap()
    records = job.records
    summary = summarize(records)
    summary["mode"] = cfg.mode
    summary["requests_per_generator"] = list(pool.submitted)
    summary["generator_versions"] = [c.version for c in pool.clients]  # at the end: the last sync included
    summary["startup_s"] = job.t0 - t_start
    summary["step_s_median"] = statistics.median(r["step_s"] for r in records) if records else 0.0
    summary.update({f"prune/{k}": v for k, v in job.controller.pruner.summary().items()})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
