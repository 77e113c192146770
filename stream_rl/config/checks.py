"""Cross-field checks that a single annotation cannot express, run on every
loaded config; each error names the fields involved."""

from __future__ import annotations

import math

import msgspec

from stream_rl.config.sections import Config, ConfigError, GeneratorConfig


def _non_finite(value, path: str):
    """Dotted paths of every NaN or infinite number in `value`."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, msgspec.Struct):
        return [p for f in value.__struct_fields__ for p in _non_finite(getattr(value, f), f"{path}.{f}".lstrip("."))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{path}[{i}]")]
    return []


def split_address(addr: str) -> tuple[str, str, str]:
    """(scheme, host, port) of a ZMQ endpoint such as tcp://HOST:PORT; a
    part that is not there is ""."""
    scheme, sep, rest = addr.partition("://")
    host, colon, port = rest.rpartition(":")
    return (scheme if sep else ""), host, (port if colon else "")


def check_address(name: str, addr: str) -> None:
    """A ZMQ endpoint the roles can bind or connect: tcp://HOST:PORT or ipc://PATH."""
    if addr.startswith("ipc://") and len(addr) > len("ipc://"):
        return
    scheme, host, port = split_address(addr)
    if not (scheme == "tcp" and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"{name} must be tcp://HOST:PORT (PORT 1-65535) or ipc://PATH; got {addr!r}")


def check(cfg: Config) -> None:
    bad = _non_finite(cfg, "")
    if bad:
        raise ConfigError(f"{', '.join(bad)}: must be a finite number (not NaN or infinity)")
    for name, addr in (("learner.addr", cfg.learner.addr), ("learner.reply_addr", cfg.learner.reply_addr),
                       ("generator.request_addr", cfg.generator.request_addr),
                       ("generator.stream_addr", cfg.generator.stream_addr)):
        check_address(name, addr)
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
    in_flight = g.target_groups if cfg.mode == "sync" else math.ceil(g.overprovision * g.target_groups)
    if cfg.buffer.max_groups < in_flight:
        raise ConfigError(
            f"buffer.max_groups ({cfg.buffer.max_groups}) is below the {in_flight} groups mode="
            f"{cfg.mode!r} keeps in flight (generator.overprovision x generator.target_groups)")
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
    if cfg.learner.ranks % cfg.ray.learner_nodes:
        raise ConfigError(f"learner.ranks ({cfg.learner.ranks}) must split evenly over ray.learner_nodes "
                          f"({cfg.ray.learner_nodes})")
    sp = cfg.sparsity
    if sp.mode != "off" and not sp.min_window <= sp.window <= sp.max_window:
        raise ConfigError(f"sparsity.window ({sp.window}) must lie within sparsity.min_window ({sp.min_window}) "
                          f"and sparsity.max_window ({sp.max_window})")
    if sp.mode == "schedule" and not g.return_logprobs:
        raise ConfigError("sparsity.mode=schedule steers by the engine/learner mismatch, which needs the engine's "
                          "log-probs: set generator.return_logprobs=true")
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


def generator_addrs(g: GeneratorConfig, index: int) -> tuple[str, str]:
    """(request_addr, stream_addr) of generator `index`."""
    if index == 0 and not g.hosts:
        return g.request_addr, g.stream_addr
    out = []
    for field, addr in (("request_addr", g.request_addr), ("stream_addr", g.stream_addr)):
        scheme, host, port = split_address(addr)
        if scheme != "tcp" or not port.isdigit():
            raise ConfigError(f"generator.{field} must be tcp://HOST:PORT with generator.count > 1 or "
                              f"generator.hosts; got {addr!r}")
        out.append(f"tcp://{g.hosts[index] if g.hosts else host}:{int(port) + 2 * index}")
    return out[0], out[1]
