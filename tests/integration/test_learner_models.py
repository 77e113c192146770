"""The learner on other architectures than the tiny Qwen3: a LLaMA with
untied embeddings and a list eos_token_id (no pad token), and a Granite,
whose logits are its output layer's divided by `logits_scaling`."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import cfg_with
from stream_rl.learner.packing import head_gives_logits, pad_layout, response_logprobs
from stream_rl.learner.samples import Sample
from stream_rl.learner.trainer import Learner, pad_token_id
from tests.user_world import build_llama, chat_tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def granite_dir(tmp_path_factory):
    from transformers import GraniteConfig, GraniteForCausalLM

    tok = chat_tokenizer(pad=True)
    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                        logits_scaling=4.0, tie_word_embeddings=True, pad_token_id=0, eos_token_id=0)
    out = tmp_path_factory.mktemp("granite") / "model"
    GraniteForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def samples(seed: int = 0, n: int = 6) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randint(3, 258) for _ in range(rng.randint(3, 8))]
        r = [rng.randint(3, 258) for _ in range(rng.randint(2, 10))]
        out.append(Sample(p, r, 1.0 if i % 2 else -1.0, None, [0] * len(r), group_id=f"g{i // 3}",
                          sample_id=str(i), group_size=3))
    return out


def learner_for(engine_cfg, path, **changes) -> Learner:
    base = dict(model__path=str(path), pruner__mode="none", learner__offpolicy="none", learner__device="cpu",
                learner__kl_beta=0.0, learner__minibatches=1)
    base.update(changes)
    return Learner(cfg_with(engine_cfg, **base))


def test_pad_token_id_of_every_config_shape():
    from types import SimpleNamespace as C

    assert pad_token_id(C(pad_token_id=None, eos_token_id=[128001, 128009])) == 128001  # Llama-3-Instruct
    assert pad_token_id(C(pad_token_id=5, eos_token_id=[1, 2])) == 5
    assert pad_token_id(C(pad_token_id=0, eos_token_id=7)) == 0  # 0 is a token, not "missing"
    assert pad_token_id(C(pad_token_id=None, eos_token_id=None)) == 0
    assert pad_token_id(C()) == 0


@pytest.mark.parametrize("packing", [True, False])
def test_llama_with_a_list_eos_trains(engine_cfg, llama_dir, packing):
    """The Llama-3 shape: no pad id, eos a list. The first update used to fail
    with `full(): fill_value must be Number, not list`."""
    lrn = learner_for(engine_cfg, llama_dir, learner__packing=packing, learner__pack_row_tokens=32)
    assert lrn.model.config.pad_token_id is None and isinstance(lrn.model.config.eos_token_id, list)
    assert lrn.pad_id == lrn.model.config.eos_token_id[0]
    before = {k: v.clone() for k, v in lrn.model.named_parameters()}
    stats = lrn.step(samples())
    assert stats["samples_trained"] == 6 and torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(before[k], v) for k, v in lrn.model.named_parameters())
    # Untied: the output layer is its own tensor, and the learner sends it to the engines.
    assert "lm_head.weight" in lrn.weights_for_sync()


def _own_forward_logprobs(model, batch: list[Sample]) -> torch.Tensor:
    """log_softmax of the model's own forward, one unpadded sequence at a time."""
    out = []
    with torch.no_grad():
        for s in batch:
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            logits = model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            n = len(s.prompt_ids)
            out.append(lp[n - 1:-1].gather(1, ids[0, n:, None]).squeeze(1))
    return torch.cat(out)


@pytest.mark.parametrize("model", ["llama", "granite"])
def test_learner_logprobs_are_the_models_own(engine_cfg, llama_dir, granite_dir, model):
    """The learner takes a model's logits the way its forward does: Granite
    divides its output layer's by logits_scaling (the learner was 0.15 nats
    off); LLaMA's are the output layer's, which the fast path runs alone."""
    lrn = learner_for(engine_cfg, llama_dir if model == "llama" else granite_dir, learner__packing=True,
                      learner__pack_row_tokens=32)
    assert head_gives_logits(lrn.model) == (model == "llama")
    batch = samples(1)
    got, _ = lrn.logprobs(batch)
    want = _own_forward_logprobs(lrn.model, batch)
    assert torch.allclose(torch.cat([got[id(s)] for s in batch]), want, atol=2e-5)
    assert lrn.model.training  # the check does not leave the model in eval mode


def test_padded_layout_with_the_llama_pad_id(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    batch = samples(2)
    lay = pad_layout([(s.prompt_ids, s.response_ids) for s in batch], pad_token_id(model.config))
    with torch.no_grad():
        assert torch.allclose(response_logprobs(model, lay), _own_forward_logprobs(model, batch), atol=2e-5)
