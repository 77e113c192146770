"""`stream-rl bench learner`: the learner's passes on a full and a pruned
batch, padded and packed.

One batch from the tiny world (or whatever `model.path` / `data.path` name):
`generator.target_groups` prompts drawn with `run.seed`, `generator.group_size`
responses each sampled from the checkpoint with Hugging Face `generate`
(temperature `generator.temperature`, at most `generator.max_tokens` tokens,
ending at and keeping the EOS token; the sampling log-probs stand for the
engine's rollout log-probs, which `learner.offpolicy` tis/decoupled need),
random 0/1 rewards and group advantages, every token of version 0 (a
group whose rewards come out all equal has no gradient, and the update pass
skips it, as in training: `update_samples_without_gradient`). The
pruned batch (kappa = 0.5) is a seeded random half of each group (inclusion
0.5, advantages over the survivors: the passes' cost does not depend on
their values).

Four configurations: kappa 1 / 0.5, each padded and packed
(`learner.packing`). Each has its own `Learner` loaded from the checkpoint,
one untimed warm-up of both passes, then `repeats` timed log-prob passes
(`Learner.logprobs`) and update passes (`Learner.step`); the repeat loop is
outside the configuration loop, so the machine's drift hits every
configuration alike. Seconds are medians over the repeats.

- logprob_speedup, update_speedup: (kappa 1, padded) over (kappa 0.5, packed),
  what pruning and packing together buy (ARRoL measured 1.84 and 2.08);
- packing_logprob_speedup, packing_update_speedup: packing alone at kappa 1;
- pruning_logprob_speedup, pruning_update_speedup: pruning alone, packed;
- padding_fraction: the padding share of the tokens the forward passes see,
  kappa 0.5 packed;
- *_min: the same from the fastest repeat, less sensitive to other load on
  a shared machine.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from pathlib import Path

import msgspec

from benchmarks.common import BenchSetupError, emit
from stream_rl.config import Config
from stream_rl.learner.advantages import group_advantages
from stream_rl.learner.samples import Sample

KAPPAS = (1.0, 0.5)
CONFIGS: tuple[tuple[float, bool], ...] = tuple((k, p) for k in KAPPAS for p in (False, True))


def config_name(kappa: float, packing: bool) -> str:
    return f"kappa_{kappa:g}_{'packed' if packing else 'padded'}"


def _check(cfg: Config, repeats: int) -> None:
    if repeats < 1:
        raise BenchSetupError(f"--steps (timed repeats per configuration) must be >= 1; got {repeats}")
    if cfg.generator.group_size < 2:
        raise BenchSetupError(f"generator.group_size must be >= 2 for a kappa = 0.5 half of each group; "
                              f"got {cfg.generator.group_size}")
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise BenchSetupError(f"model.path {cfg.model.path} holds no checkpoint "
                              "(for the tiny world run `stream-rl prepare-tiny` first)")


def sample_responses(model, prompts: list[tuple[int, ...]], group_size: int, max_tokens: int,
                     temperature: float, eos_id: int, chunk: int = 256, device: str = "cpu"):
    """`group_size` sampled responses per prompt, each cut after its first EOS
    (kept), and the sampling distribution's log-prob of each token (the
    rollout log-probs an engine returns). Prompts of one length go through
    `generate` together, so no prompt is padded. `device`: the model's."""
    import torch

    out: list[list[tuple[list[int], list[float]]]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    per_call = max(1, chunk // group_size)
    with torch.no_grad():
        for n in sorted(by_len):
            idx = by_len[n]
            for k in range(0, len(idx), per_call):
                part = idx[k:k + per_call]
                ids = torch.tensor([prompts[i] for i in part], dtype=torch.long, device=device)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                     temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                                     num_return_sequences=group_size, eos_token_id=eos_id, pad_token_id=eos_id,
                                     return_dict_in_generate=True, output_scores=True)
                new = gen.sequences[:, n:]
                # scores[t]: the (temperature-scaled) logits token t was drawn from.
                lps = torch.stack([torch.log_softmax(sc.float(), -1).gather(1, new[:, t:t + 1]).squeeze(1)
                                   for t, sc in enumerate(gen.scores)], 1)
                for row, (seq, lp) in enumerate(zip(new.tolist(), lps.tolist())):
                    end = seq.index(eos_id) + 1 if eos_id in seq else len(seq)
                    out[part[row // group_size]].append((seq[:end], lp[:end]))
    return out


def build_batches(cfg: Config) -> dict[float, list[Sample]]:
    """The benchmark's batch (kappa 1) and its survivors (kappa 0.5)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stream_rl.data import DataError, PromptDataset

    g = cfg.generator
    tok = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    try:
        data = PromptDataset.load(cfg.data, tok)
    except DataError as err:
        raise BenchSetupError(str(err)) from None
    rng = random.Random(cfg.run.seed)
    if g.target_groups > len(data.rows):
        raise BenchSetupError(f"generator.target_groups ({g.target_groups}) exceeds the {len(data.rows)} prompts")
    rows = rng.sample(data.rows, g.target_groups)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    model = model.to(cfg.learner.device).eval()  # sampled where the learner runs (a GPU when it has one)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        eos = tok.eos_token_id
    torch.manual_seed(cfg.run.seed)
    responses = sample_responses(model, [r.prompt_ids for r in rows], g.group_size, g.max_tokens,
                                 g.temperature, eos, device=cfg.learner.device)
    del model
    full, half = [], []
    for gi, (row, resps) in enumerate(zip(rows, responses)):
        rewards = [float(rng.random() < 0.5) for _ in resps]
        members = [Sample(list(row.prompt_ids), r, a, lp, [0] * len(r), inclusion=1.0, group_id=f"g{gi}",
                          sample_id=f"g{gi}.{j}", group_size=len(resps))
                   for j, ((r, lp), a) in enumerate(zip(resps, group_advantages(rewards, cfg.learner.adv_eps)))]
        full += members
        keep = sorted(rng.sample(range(len(resps)), len(resps) // 2))
        for j, a in zip(keep, group_advantages([rewards[j] for j in keep], cfg.learner.adv_eps)):
            m = members[j]
            half.append(Sample(m.prompt_ids, m.response_ids, a, m.rollout_logprobs, m.versions, inclusion=0.5,
                               group_id=m.group_id, sample_id=m.sample_id, group_size=len(resps)))
    return {1.0: full, 0.5: half}


def _with_packing(cfg: Config, packing: bool) -> Config:
    return msgspec.structs.replace(cfg, learner=msgspec.structs.replace(cfg.learner, packing=packing))


def _forward_shape(learner, samples: list[Sample]) -> tuple[int, int]:
    """(micro-batches, tokens the forward passes see, padding included)."""
    from stream_rl.learner.packing import pack_layout, pad_layout
    from stream_rl.learner.trainer import micro_batches

    lc = learner.cfg.learner
    mbs = micro_batches(samples, lc.micro_batch_tokens, lc.packing, lc.pack_row_tokens)
    total = 0
    for mb in mbs:
        seqs = [(s.prompt_ids, s.response_ids) for s in mb]
        lay = pack_layout(seqs, lc.pack_row_tokens, learner.pad_id) if lc.packing else pad_layout(seqs, learner.pad_id)
        total += lay.ids.numel()
    return len(mbs), total


def bench_learner(cfg: Config, repeats: int = 3) -> dict:
    import torch

    from stream_rl.learner.trainer import Learner

    _check(cfg, repeats)
    t0 = time.time()
    batches = build_batches(cfg)
    build_s = time.time() - t0

    learners, results, times, padded_lp = {}, {}, {}, {}
    for kappa, packing in CONFIGS:
        name = config_name(kappa, packing)
        torch.manual_seed(cfg.run.seed)
        lrn = Learner(_with_packing(cfg, packing))
        batch = batches[kappa]
        # Warm-up, untimed: both passes once, on the checkpoint's weights.
        lp, pad_lp = lrn.logprobs(batch)
        stats = lrn.step(batch, policy_version=0)
        lp = torch.cat([lp[id(s)] for s in batch])
        if not packing:
            padded_lp[kappa] = lp
        n_mb, fwd_tokens = _forward_shape(lrn, batch)
        resp = sum(len(s.response_ids) for s in batch)
        learners[name] = lrn
        times[name] = {"logprob": [], "update": []}
        results[name] = {
            "kappa": kappa, "packing": packing, "attn_implementation": lrn.model.config._attn_implementation,
            "sequences": len(batch), "response_tokens": resp,
            "total_tokens": resp + sum(len(s.prompt_ids) for s in batch),
            "forward_tokens": fwd_tokens, "micro_batches": n_mb,
            "padding_fraction": pad_lp, "update_padding_fraction": stats["padding_fraction"],
            # The update pass skips these (all-equal rewards in their group: no gradient).
            "update_samples_without_gradient": stats["samples_without_gradient"],
            # Checks, on the checkpoint's weights: the learner's log-probs
            # against the sampler's, and (packed) against the padded layout's.
            "rollout_logprob_abs_diff": stats["rollout_logprob_abs_diff"],
        }
        if packing and kappa in padded_lp:
            results[name]["logprob_max_abs_diff_vs_padded"] = float((lp - padded_lp[kappa]).abs().max())

    for _ in range(repeats):
        for kappa, packing in CONFIGS:
            name = config_name(kappa, packing)
            lrn, batch = learners[name], batches[kappa]
            t = time.perf_counter()
            lrn.logprobs(batch)
            times[name]["logprob"].append(time.perf_counter() - t)
            t = time.perf_counter()
            lrn.step(batch, policy_version=0)
            times[name]["update"].append(time.perf_counter() - t)

    for name, r in results.items():
        r["logprob_s"] = statistics.median(times[name]["logprob"])
        r["update_s"] = statistics.median(times[name]["update"])
        r["logprob_s_min"] = min(times[name]["logprob"])
        r["update_s_min"] = min(times[name]["update"])
        r["logprob_s_all"] = [round(x, 4) for x in times[name]["logprob"]]
        r["update_s_all"] = [round(x, 4) for x in times[name]["update"]]

    base, best = results[config_name(1.0, False)], results[config_name(0.5, True)]
    packed_full = results[config_name(1.0, True)]
    result = {
        "benchmark": "learner",
        "logprob_speedup": base["logprob_s"] / best["logprob_s"],
        "update_speedup": base["update_s"] / best["update_s"],
        "packing_logprob_speedup": base["logprob_s"] / packed_full["logprob_s"],
        "packing_update_speedup": base["update_s"] / packed_full["update_s"],
        "pruning_logprob_speedup": packed_full["logprob_s"] / best["logprob_s"],
        "pruning_update_speedup": packed_full["update_s"] / best["update_s"],
        "padding_fraction": best["padding_fraction"],
        # The same from the fastest repeats: less sensitive to other load on a
        # shared machine (compare the two to see how noisy the run was).
        "logprob_speedup_min": base["logprob_s_min"] / best["logprob_s_min"],
        "update_speedup_min": base["update_s_min"] / best["update_s_min"],
        "configs": results,
    }
    result["targets"] = {
        "logprob_speedup_at_least_1.8": result["logprob_speedup"] >= 1.8,
        "update_speedup_at_least_1.8": result["update_speedup"] >= 1.8,
        "padding_fraction_at_most_0.10": result["padding_fraction"] <= 0.10,
    }
    lc, g = cfg.learner, cfg.generator
    result["setup"] = {
        "model": cfg.model.path, "dtype": cfg.model.dtype, "device": lc.device, "groups": g.target_groups,
        "group_size": g.group_size, "max_tokens": g.max_tokens, "temperature": g.temperature,
        "micro_batch_tokens": lc.micro_batch_tokens, "pack_row_tokens": lc.pack_row_tokens, "loss": lc.loss,
        "attention": lc.attention,
        "repeats": repeats, "warmup": 1, "seed": cfg.run.seed, "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
        "batch_build_s": round(build_s, 1), "wall_s": round(time.time() - t0, 1),
    }
    return result


def main(cfg: Config, out_json: str | None, repeats: int) -> dict:
    return emit(bench_learner(cfg, repeats), out_json)
