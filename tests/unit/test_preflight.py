"""What a job checks before it starts: model config, tokenizer and data,
offline, through the path `stream-rl train` and `check-config` take."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT
from stream_rl.config import ConfigError, load_config
from stream_rl.preflight import check_job, summary
from tests.user_world import chat_tokenizer


def stand_in(path, max_positions: int = 40960, vocab: int | None = None):
    """A local directory standing in for a hub checkpoint: a tokenizer with a
    chat template and a Qwen3 config (no weights: nothing here loads them)."""
    from transformers import Qwen3Config

    tok = chat_tokenizer(pad=True)
    tok.save_pretrained(path)
    Qwen3Config(vocab_size=vocab or len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                max_position_embeddings=max_positions).save_pretrained(path)
    return path


def test_qwen3_dapo_config_tokenizes_its_prompts_offline(tmp_path):
    """configs/qwen3-1.7b-dapo-math.yaml loads, validates and renders its
    prompts through the chat template and system prompt it sets; a local
    tokenizer stands in for Qwen3's, a local file for DAPO-Math-17k."""
    data = tmp_path / "dapo.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "solution": s}) + "\n" for p, s in [
        ("Find the sum of all integer bases $b>9$ for which $17_b$ divides $97_b$.", "70"),
        ("Compute $\\frac{3}{4} + \\frac{1}{8}$.", "\\frac{7}{8}")]))
    cfg = load_config(ROOT / "configs" / "qwen3-1.7b-dapo-math.yaml",
                      [f"model.path={stand_in(tmp_path / 'qwen3')}", f"data.path={data}"])
    job = check_job(cfg)
    assert len(job.dataset.rows) == 2 and all(isinstance(t, int) for t in job.dataset.rows[0].prompt_ids)
    shown = summary(job)["first_prompt_rendered"]
    assert shown.startswith("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                            "\\boxed{}.<|im_end|>\n<|im_start|>user\nFind the sum")
    assert shown.endswith("<|im_start|>assistant\n")
    # Eval inherits the training answer key: math-verify's extraction against `solution`.
    assert (cfg.eval.answer_field, cfg.eval.answer_regex) == ("solution", None)


def test_a_tokenizer_of_another_model_is_refused(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.path={stand_in(tmp_path / 'm', vocab=100)}"])
    with pytest.raises(ConfigError, match="tokenizer has 259 tokens but the model's vocabulary only 100"):
        check_job(cfg)


def test_max_model_len_beyond_the_models_positions_is_refused(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.path={stand_in(tmp_path / 'm', max_positions=256)}"])
    with pytest.raises(ConfigError, match=r"model.max_model_len \(512\) exceeds the 256 positions"):
        check_job(cfg)


def test_qwen3_eval_config_renders_its_questions_offline(tmp_path):
    """configs/eval-qwen3-1.7b-math.yaml, the other shipped config with a
    chat template: its MATH-500-style questions render the same way."""
    data = tmp_path / "math500.jsonl"
    data.write_text(json.dumps({"problem": "What is $1+1$?", "answer": "2"}) + "\n")
    cfg = load_config(ROOT / "configs" / "eval-qwen3-1.7b-math.yaml",
                      [f"model.path={stand_in(tmp_path / 'qwen3')}", f"data.path={data}"])
    shown = summary(check_job(cfg))["first_prompt_rendered"]
    assert shown.startswith("<|im_start|>system\nPlease reason step by step") and "What is $1+1$?" in shown
    assert (cfg.eval.answer_field, cfg.eval.answer_regex) == ("answer", None)
