"""What a job checks before it starts anything: the model's config and
tokenizer, the data rendered through them, and how they fit the config.

`stream-rl train` and `controller` run `check_job` before the first engine
or learner process starts (an error there costs seconds, not the minute an
engine takes to load), and `check-config` runs it too, with the engine's own
shape check. Every error names the file (and line) or the config key to
change.
"""

from __future__ import annotations

from dataclasses import dataclass

from stream_rl.config import Config, ConfigError
from stream_rl.data import PromptDataset
from stream_rl.metrics_wandb import import_wandb


@dataclass
class CheckedJob:
    tokenizer: object
    dataset: PromptDataset
    model_config: object  # the Hugging Face config at model.path


def _from_model_path(cfg: Config, auto, what: str):
    try:
        return auto.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as err:
        raise ConfigError(f"model.path {cfg.model.path!r}: cannot load {what} there "
                          f"({type(err).__name__}: {err})") from None


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    return _from_model_path(cfg, AutoTokenizer, "a tokenizer")


def load_model_config(cfg: Config):
    from transformers import AutoConfig

    return _from_model_path(cfg, AutoConfig, "a Hugging Face model config")


def check_model(cfg: Config):
    """The model config and tokenizer at model.path, checked against each
    other and the config."""
    mc, tok = load_model_config(cfg), load_tokenizer(cfg)
    vocab = getattr(mc, "vocab_size", None) or getattr(getattr(mc, "text_config", None), "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise ConfigError(f"model.path {cfg.model.path!r}: its tokenizer has {len(tok)} tokens but the model's "
                          f"vocabulary only {vocab}: the tokenizer belongs to another model")
    limit = getattr(mc, "max_position_embeddings", None)
    if limit is not None and cfg.model.max_model_len > limit:
        raise ConfigError(f"model.max_model_len ({cfg.model.max_model_len}) exceeds the {limit} positions of "
                          f"model.path's model (max_position_embeddings)")
    return mc, tok


def check_job(cfg: Config) -> CheckedJob:
    """The model, tokenizer and training data, loaded and checked; and
    wandb installed if the config logs to it."""
    if cfg.run.wandb_project:
        import_wandb()
    mc, tok = check_model(cfg)
    return CheckedJob(tok, PromptDataset.load(cfg.data, tok), mc)


def check_engine(job: CheckedJob) -> str | None:
    """Why the engine could not serve this model (see `engine_shape_problem`),
    or None; imports vLLM, so only `check-config` asks before a start (a
    generator asks itself)."""
    from stream_rl.generator.engine import engine_shape_problem

    return engine_shape_problem(job.model_config)


def summary(job: CheckedJob) -> dict:
    """What `check-config` prints after the config: what it found."""
    ds = job.dataset
    lens = sorted(len(r.prompt_ids) for r in ds.rows)
    return {"model_type": getattr(job.model_config, "model_type", None), "tokenizer_tokens": len(job.tokenizer),
            "data": ds.source, "prompts": len(ds.rows), "prompts_too_long": len(ds.overlong),
            "prompt_tokens_median": lens[len(lens) // 2], "prompt_tokens_max": lens[-1],
            "first_prompt_rendered": job.tokenizer.decode(list(ds.rows[0].prompt_ids))}
