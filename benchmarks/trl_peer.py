"""The peer system: TRL's `GRPOTrainer` on the same model, prompts, reward and batch.

`run_trl(cfg, out_dir, steps)` trains `cfg.model.path` with TRL (1.16) on the
prompts `PromptDataset.load(cfg.data, ...)` gives, rewarded by the project's
verifier, with the config's group size, batch, length budget, temperature,
optimizer and clipping mapped onto `GRPOConfig` (see `grpo_args`). Generation
is Hugging Face `generate` in the trainer's process (no vLLM), on the CPU, in
fp32: one synchronous generate-then-train step per optimizer step.

Per optimizer step a record goes to OUT/metrics.jsonl:
  step, wall_s (since `on_train_begin`), step_s, reward_policy_mean and
  tokens_trained, plus the same numbers under the names `stream-rl train`
  uses (reward_mean, tokens_generated, policy_version, ...).
reward_policy_mean and tokens_trained are measured in the reward function,
which TRL calls once per optimizer step (steps_per_generation = 1,
num_iterations = 1) on that step's whole batch: the mean verifier score of
its completions, and the sum of their lengths in tokens as TRL trains them
(up to and including the first eos, the mask TRL's loss uses; truncated
completions count in full even when `mask_truncated` leaves them out of the
loss, as `stream-rl train` counts them). After training both are checked
against TRL's own logs (`reward`, and `completions/mean_length` x batch).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from stream_rl.config import Config
from stream_rl.data import PromptDataset, PromptRow, render_prompt
from stream_rl.learner.service import snapshot_path
from stream_rl.verifier import make_verifier

TRL_VERSION = "1.16.0"
_MISSING = f"the trl baseline needs `pip install 'stream_rl[trl]'` (trl=={TRL_VERSION})"

# learner.loss -> (TRL loss_type, importance_sampling_level). TRL's "grpo" is
# ours: each sequence's token mean, then the mean over sequences.
_LOSS = {"grpo": ("grpo", "token"), "dapo": ("dapo", "token"), "gspo": ("grpo", "sequence")}


def _import_trl():
    try:
        import trl
    except ImportError as err:
        raise ImportError(_MISSING) from err
    return trl


def batch_completions(cfg: Config) -> int:
    """Completions per optimizer step: target_groups groups of group_size."""
    return cfg.generator.target_groups * cfg.generator.group_size


def grpo_args(cfg: Config, out_dir: str | Path, steps: int):
    """The `GRPOConfig` matching `cfg` (TRL 1.16 names)."""
    trl = _import_trl()
    g, lc = cfg.generator, cfg.learner
    if lc.kl_beta:
        raise ValueError("the trl peer runs with beta=0; learner.kl_beta must be 0")
    loss_type, is_level = _LOSS[lc.loss]
    return trl.GRPOConfig(
        output_dir=str(Path(out_dir) / "trl_output"),
        # Batch: per_device_train_batch_size counts completions; one generation
        # batch (target_groups prompts x group_size) per optimizer step.
        num_generations=g.group_size,
        per_device_train_batch_size=batch_completions(cfg),
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        max_steps=steps,
        # Generation.
        max_completion_length=g.max_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=0,
        use_vllm=False,
        # Loss.
        beta=0.0,
        loss_type=loss_type,
        importance_sampling_level=is_level,
        epsilon=lc.clip_low,
        epsilon_high=lc.clip_high,
        scale_rewards="group",
        mask_truncated_completions=lc.mask_truncated,
        # Optimizer: AdamW at a constant rate after the warm-up, as the project's learner.
        learning_rate=lc.lr,
        lr_scheduler_type="constant_with_warmup" if lc.warmup_steps else "constant",
        warmup_steps=lc.warmup_steps,  # as stream_rl.learner.trainer.learning_rate
        optim="adamw_torch",
        adam_beta1=lc.betas[0],
        adam_beta2=lc.betas[1],
        adam_epsilon=lc.adam_eps,
        weight_decay=lc.weight_decay,
        max_grad_norm=lc.grad_clip,
        # Machine: CPU, fp32, no checkpointing of activations.
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        shuffle_dataset=cfg.data.shuffle,
        dataloader_num_workers=0,
        # Logging: every step, nowhere but the callback.
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=not cfg.run.progress,
    )


def _prompt_for_trl(cfg: Config, text: str):
    """The "prompt" value TRL renders to the ids `render_prompt` gives: the text,
    or the conversation when the data is chat-templated."""
    if not cfg.data.apply_chat_template:
        return text
    msgs = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
    return msgs + [{"role": "user", "content": text}]


def build_dataset(cfg: Config, rows: list[PromptRow]):
    """A `datasets.Dataset`: "prompt" (text, or messages) and "reference" (the answer field)."""
    import datasets

    return datasets.Dataset.from_dict({
        "prompt": [_prompt_for_trl(cfg, r.prompt) for r in rows],
        "reference": [r.answer for r in rows],
    })


def check_prompt_ids(trainer, cfg: Config, tokenizer, rows: list[PromptRow], n: int = 8) -> None:
    """Assert that TRL turns the first `n` prompts into the ids `render_prompt` (and so training) uses."""
    sample = rows[:n]
    got, _, _ = trainer._tokenize_prompts([_prompt_for_trl(cfg, r.prompt) for r in sample])
    for row, ids in zip(sample, got):
        want = render_prompt(cfg.data, tokenizer, row.prompt)
        if list(ids) != list(want) or list(want) != list(row.prompt_ids):
            raise AssertionError(f"TRL tokenizes prompt {row.prompt!r} to {list(ids)}; "
                                 f"render_prompt gives {list(want)}")


class _StepStats:
    """What the reward function saw since the last optimizer step."""

    def __init__(self):
        self.rewards: list[float] = []
        self.lengths: list[int] = []
        self.truncated = 0  # completions cut off by max_completion_length (no eos)
        self.calls = 0

    def take(self):
        out = (self.rewards, self.lengths, self.truncated, self.calls)
        self.rewards, self.lengths, self.truncated, self.calls = [], [], 0, 0
        return out


def make_reward_func(cfg: Config, stats: _StepStats, eos_ids: set[int], max_tokens: int):
    verifier = make_verifier(cfg.data)

    def verifier_reward(prompts, completions, completion_ids, reference, **kwargs):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        scores = [float(verifier.score(t, ref)) for t, ref in zip(texts, reference)]
        stats.rewards.extend(scores)
        stats.lengths.extend(len(ids) for ids in completion_ids)
        stats.truncated += sum(1 for ids in completion_ids if len(ids) >= max_tokens and ids[-1] not in eos_ids)
        stats.calls += 1
        return scores

    return verifier_reward


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _make_callback(metrics_path: Path, stats: _StepStats, clock: dict, records: list, trl_logs: dict,
                   threshold: float | None, snapshot_every: int = 0):
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["begin"] = clock["last"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            rewards, lengths, truncated, calls = stats.take()
            if calls != 1:
                raise RuntimeError(f"step {state.global_step}: the reward function ran {calls} times; "
                                   "expected once per optimizer step")
            rec = {
                "step": state.global_step,
                "wall_s": now - clock["begin"],
                "step_s": now - clock["last"],
                "reward_policy_mean": _mean(rewards),
                "reward_mean": _mean(rewards),
                "tokens_trained": sum(lengths),
                "tokens_generated": sum(lengths),
                "completions": len(lengths),
                "groups": len(lengths) // max(1, args.num_generations),
                "policy_version": state.global_step,
                "response_len_mean": _mean(lengths),
                "truncated_frac": truncated / max(1, len(lengths)),
            }
            rec["trained_tokens_per_s"] = rec["tokens_trained"] / rec["step_s"] if rec["step_s"] else 0.0
            if snapshot_every and state.global_step % snapshot_every == 0:  # as the project's learner
                kwargs["model"].save_pretrained(snapshot_path(metrics_path.parent, state.global_step))
            clock["last"] = now
            records.append(rec)
            with metrics_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if threshold is not None and rec["reward_policy_mean"] >= threshold and "threshold_step" not in clock:
                clock["threshold_step"] = rec["step"]
                clock["threshold_wall_s"] = rec["wall_s"]

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                trl_logs[state.global_step] = dict(logs)

        def on_train_end(self, args, state, control, **kwargs):
            clock["end"] = time.perf_counter()

    return MetricsCallback()


def _check_against_trl_logs(records: list[dict], trl_logs: dict) -> dict:
    """Largest gaps between the records and TRL's own per-step logs."""
    reward_gap, tokens_gap, checked = 0.0, 0.0, 0
    for rec in records:
        logs = trl_logs.get(rec["step"])
        if not logs:
            continue
        checked += 1
        if logs.get("reward") is not None:
            reward_gap = max(reward_gap, abs(logs["reward"] - rec["reward_policy_mean"]))
        if logs.get("completions/mean_length") is not None:
            tokens_gap = max(tokens_gap, abs(logs["completions/mean_length"] * rec["completions"]
                                             - rec["tokens_trained"]))
    return {"steps_checked": checked, "reward_max_abs_diff": reward_gap, "tokens_max_abs_diff": tokens_gap}


def run_trl(cfg: Config, out_dir: str | Path, steps: int, threshold_hint: float | None = None) -> dict:
    """Train `steps` GRPO steps with TRL; records to OUT/metrics.jsonl, the policy to OUT/final_model.

    `threshold_hint`: a reward level; the result then says at which step (and
    wall_s) reward_policy_mean first reached it (None if never). It does not
    stop training early.
    """
    t_entry = time.perf_counter()
    trl = _import_trl()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    data = PromptDataset.load(cfg.data, tokenizer)
    args = grpo_args(cfg, out, steps)

    stats = _StepStats()
    eos = set()
    gen_eos = model.generation_config.eos_token_id
    eos.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    reward = make_reward_func(cfg, stats, eos, cfg.generator.max_tokens)
    clock: dict = {}
    records: list[dict] = []
    trl_logs: dict = {}
    callback = _make_callback(metrics_path, stats, clock, records, trl_logs, threshold_hint,
                              cfg.run.snapshot_every)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=build_dataset(cfg, data.rows),
                              processing_class=tokenizer, callbacks=[callback])
    if not cfg.run.progress:  # the records are the log; no per-step dicts on stdout
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    check_prompt_ids(trainer, cfg, tokenizer, data.rows)

    trainer.train()
    t_end = clock.get("end", time.perf_counter())
    final = out / "final_model"
    trainer.model.save_pretrained(final)
    tokenizer.save_pretrained(final)

    startup_s = clock["begin"] - t_entry
    result = {
        "system": "trl",
        "wall_s": t_end - clock["begin"],
        "startup_s": startup_s,
        "steps": len(records),
        "step_s_median": sorted(r["step_s"] for r in records)[len(records) // 2] if records else 0.0,
        "tokens_trained": sum(r["tokens_trained"] for r in records),
        "records": records,
        "final_model": str(final),
        "trl_version": trl.__version__,
        "trl_log_check": _check_against_trl_logs(records, trl_logs),
    }
    if threshold_hint is not None:
        result["threshold_hint"] = threshold_hint
        result["threshold_step"] = clock.get("threshold_step")
        result["threshold_wall_s"] = clock.get("threshold_wall_s")
    bad = [r["step"] for r in records if not math.isfinite(r["reward_policy_mean"])]
    if bad:
        raise RuntimeError(f"non-finite reward at steps {bad}")
    return result
