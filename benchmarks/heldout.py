"""Held-out accuracy: greedy decoding of every held-out prompt, scored by the project's verifier.

Plain Hugging Face `generate` on the CPU (no engine), so it scores any model
directory the same way: the policy `stream-rl train` saved, the one the TRL
peer saved, or the initial model. Prompts are rendered with `render_prompt`
(the ids training used) and left-padded by hand with an attention mask; the
model derives position ids from that mask, so a batched greedy decode equals
one prompt at a time (tests/test_bench_e2e_parts.py checks it).
"""

from __future__ import annotations

import time
from pathlib import Path

from stream_rl.config import Config
from stream_rl.eval.heldout import load_heldout
from stream_rl.verifier import make_verifier

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _load_tokenizer(model_dir: str | Path, cfg: Config):
    from transformers import AutoTokenizer

    # A weights-only directory (a run's snapshot): the tokenizer is the base model's.
    src = model_dir if (Path(model_dir) / "tokenizer_config.json").is_file() else cfg.model.path
    return AutoTokenizer.from_pretrained(str(src), trust_remote_code=cfg.model.trust_remote_code)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token: cannot left-pad a batch")
    return int(pad)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return [int(i) for i in ids]


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy response ids for each prompt (up to and excluding the first eos), in the input order."""
    return [r[0] for r in _generate(model, tokenizer, prompts, max_new_tokens, batch_size, dict(do_sample=False))]


def sample_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, n: int,
                    temperature: float, top_p: float = 1.0, seed: int = 0,
                    batch_size: int = 64) -> list[list[list[int]]]:
    """`n` sampled responses per prompt (top_k off, as the generators sample)."""
    import torch

    torch.manual_seed(seed)
    return _generate(model, tokenizer, prompts, max_new_tokens, max(1, batch_size // n),
                     dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n))


def _generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
              sampling: dict) -> list[list[list[int]]]:
    """Response ids (up to and excluding the first eos) per prompt, in the input order.

    Prompts are left-padded with the pad (or eos) id and masked, so each row's
    positions start at 0 as when it is decoded alone.
    """
    import torch
    from transformers import GenerationConfig

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = _pad_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=eos, pad_token_id=pad,
                               bos_token_id=tokenizer.bos_token_id, **sampling)
    n = sampling.get("num_return_sequences", 1)
    out: list[list[list[int]] | None] = [None] * len(prompts)
    # Similar lengths share a batch: less padding, same results.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = prompts[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids):] = 1
            seqs = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen_cfg)
            for row, i in enumerate(idx):
                out[i] = []
                for j in range(n):  # generate() puts a prompt's n sequences next to each other
                    resp = seqs[row * n + j, width:].tolist()
                    cut = next((k for k, t in enumerate(resp) if t in eos), len(resp))
                    out[i].append(resp[:cut])
    return out  # type: ignore[return-value]


def heldout_responses(model_dir: str | Path, cfg: Config, path: str | Path | None = None,
                      limit: int | None = None, batch_size: int = 64, samples: int = 0, seed: int = 0):
    """(rows, dataset, tokenizer, responses): the held-out rows and, per row,
    the greedy response (`samples` 0) or `samples` responses sampled as the
    generators sample, of the model in `model_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _load_tokenizer(model_dir, cfg)
    rows, ds = load_heldout(cfg, tokenizer, path, limit)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, _DTYPES[cfg.model.dtype]),
                                                 trust_remote_code=cfg.model.trust_remote_code)
    model.to("cpu")
    prompts = [list(r.prompt_ids) for r in rows]
    g = cfg.generator
    responses = ([[r] for r in greedy_generate(model, tokenizer, prompts, g.max_tokens, batch_size)] if not samples
                 else sample_generate(model, tokenizer, prompts, g.max_tokens, samples, g.temperature, g.top_p,
                                      seed, batch_size))
    return rows, ds, tokenizer, responses


def heldout_accuracy(model_dir: str | Path, cfg: Config, path: str | Path | None = None,
                     limit: int | None = None, batch_size: int = 64, samples: int = 0, seed: int = 0) -> dict:
    """Greedy accuracy of the model in `model_dir` on the held-out prompts;
    with `samples` > 0, the mean reward of that many responses per prompt
    sampled as the generators sample (`generator.temperature`, `top_p`): the
    policy's expected reward, which pruned or length-ordered training batches
    do not estimate without bias.

    `path` defaults to `eval.jsonl` beside `data.path`; `limit` scores the
    first `limit` prompts only. Each response (special tokens skipped) is
    scored with `make_verifier(cfg.data)` against the row's `data.answer_field`.
    """
    t0 = time.perf_counter()
    rows, ds, tokenizer, responses = heldout_responses(model_dir, cfg, path, limit, batch_size, samples, seed)
    verifier = make_verifier(cfg.data)
    scores = [verifier.score(tokenizer.decode(resp, skip_special_tokens=True), row.answer)
              for resps, row in zip(responses, rows) for resp in resps]
    key = "heldout_sampled_reward" if samples else "heldout_accuracy"
    return {
        key: sum(scores) / len(scores) if scores else 0.0,
        "heldout_n": len(scores),
        "heldout_path": ds.source,
        "heldout_s": time.perf_counter() - t0,
    }
