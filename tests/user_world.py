"""A user's own world, built in the test: a tiny LLaMA-architecture model
with untied embeddings, a chat template and a list `eos_token_id` with no
pad token (Llama-3-Instruct's shape), and a math dataset with its own field
names (numbers as answers), as JSONL and as Parquet."""

from __future__ import annotations

import json
from pathlib import Path

# ChatML, as Qwen's and many instruct models' templates render it.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROBLEMS = [("What is 7 + 5?", 12), ("What is 9 - 4?", 5), ("What is 3 * 3?", 9), ("What is 8 / 2?", 4),
            ("What is 6 + 6?", 12), ("What is 10 - 7?", 3), ("What is 2 * 5?", 10), ("What is 9 / 3?", 3)]


def chat_tokenizer(pad: bool = False):
    """The tiny byte-level tokenizer with a chat template; no pad token
    unless `pad` (Llama-3's has none)."""
    from stream_rl.tiny.model import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    if not pad:
        tok.pad_token = None
    return tok


def build_llama(out: Path, seed: int = 0, max_len: int = 512) -> Path:
    """Save the LLaMA model and its tokenizer to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer()
    eos = [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=max_len,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=tok.convert_tokens_to_ids(
                             "<|im_start|>"), eos_token_id=eos, pad_token_id=None, torch_dtype="float32")
    model = LlamaForCausalLM(config).float()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_math_data(folder: Path) -> dict[str, Path]:
    """The same questions as JSONL and Parquet, fields `question` and
    `final_answer` (an int), and a held-out split beside each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "question": q, "final_answer": a} for i, (q, a) in enumerate(PROBLEMS)]
    out = {}
    for split, part in (("train", rows), ("eval", rows[:4])):
        jl = folder / f"{split}.jsonl"
        jl.write_text("".join(json.dumps(r) + "\n" for r in part))
        pq.write_table(pa.table({k: [r[k] for r in part] for k in part[0]}), folder / f"{split}.parquet")
        out[split] = jl
    return out

