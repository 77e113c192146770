"""Varlen attention against Hugging Face's own paths: the same log-probs and
gradients as the packed rows under HF's block-causal mask and as padded
rows, on the tiny Qwen3 and on random Llama (GQA) and Mistral (sliding
window) models; the sequence cuts; and that no row-sized mask is built."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.learner import varlen_attention as va
from stream_rl.learner.packing import pack_layout, pad_layout, response_logprobs
from tests.conftest import TINY_DIR

TOL = 2e-5  # fp32: the paths differ only in summation order


def random_seqs(seed: int, n: int, vocab: int, longest: int = 30) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(2, longest // 2))],
             [rng.randrange(1, vocab) for _ in range(rng.randint(1, longest))]) for _ in range(n)]


def with_attention(model, name: str):
    other = copy.deepcopy(model)
    other.set_attn_implementation(name)
    return other


def logprobs_and_grads(model, layout, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    lp = response_logprobs(model, layout)
    (lp * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), grads


def max_grad_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def tiny_qwen3():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(TINY_DIR / "model"), dtype=torch.float32,
                                                attn_implementation="sdpa")


def random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def random_mistral_sliding():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                        sliding_window=7, attn_implementation="sdpa")
    return MistralForCausalLM(cfg)


MODELS = {"tiny_qwen3": tiny_qwen3, "llama_gqa": random_llama, "mistral_sliding": random_mistral_sliding}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_varlen_equals_dense_packed_and_padded(arch):
    if arch == "tiny_qwen3" and not (TINY_DIR / "model" / "config.json").is_file():
        pytest.skip("the tiny world is not prepared (stream-rl prepare-tiny)")
    dense = MODELS[arch]()
    dense.train()  # dropout is 0 in these configs: train mode must not change the pass
    varlen = with_attention(dense, va.register())
    vocab = dense.config.vocab_size
    seqs = random_seqs(1, 14, vocab)
    packed, padded = pack_layout(seqs, 64, 0), pad_layout(seqs, 0)
    assert packed.ids.shape[0] < len(seqs)  # several sequences share rows
    w = torch.randn(sum(packed.lengths), generator=torch.Generator().manual_seed(2))
    lp_dense, g_dense = logprobs_and_grads(dense, packed, w)
    lp_pad, g_pad = logprobs_and_grads(dense, padded, w)
    lp_var, g_var = logprobs_and_grads(varlen, packed, w)
    lp_var_pad, _ = logprobs_and_grads(varlen, padded, w)  # a 2-D padding mask: the tail is a sequence
    assert float((lp_var - lp_dense).abs().max()) < TOL
    assert float((lp_var - lp_pad).abs().max()) < TOL
    assert float((lp_var_pad - lp_pad).abs().max()) < TOL
    scale = max(float(g.abs().max()) for g in g_dense.values())
    assert max_grad_diff(g_var, g_dense) < TOL * scale
    assert max_grad_diff(g_var, g_pad) < TOL * scale


def test_sliding_window_is_applied():
    """The window matters here (sequences longer than 7): without it the
    log-probs differ from the model's own sliding-window attention."""
    dense = random_mistral_sliding()
    varlen = with_attention(dense, va.register())
    seqs = random_seqs(3, 6, 300, longest=40)
    lay = pack_layout(seqs, 128, 0)
    with torch.no_grad():
        ref = response_logprobs(dense, lay)
        assert float((response_logprobs(varlen, lay) - ref).abs().max()) < TOL
        varlen.config.sliding_window = None
        for layer in varlen.model.layers:
            layer.self_attn.sliding_window = None
        assert float((response_logprobs(varlen, lay) - ref).abs().max()) > 1e-3


def packed_positions(rows: list[list[int]]) -> torch.Tensor:
    width = max(sum(r) for r in rows)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for i, lens in enumerate(rows):
        off = 0
        for n in lens + [width - sum(lens)]:
            pos[i, off:off + n] = torch.arange(n)
            off += n
    return pos


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=6), min_size=1, max_size=5))
def test_segments_are_the_packed_sequences(rows):
    from transformers.masking_utils import find_packed_sequence_indices

    pos = packed_positions(rows)
    width = pos.shape[1]
    seg = va.segments(pos)
    expected = []
    for i, lens in enumerate(rows):
        off = i * width
        for n in lens + ([width - sum(lens)] if width > sum(lens) else []):
            expected.append((off, off + n))
            off += n
    assert seg.bounds == expected
    assert seg.cu_seqlens.tolist() == [s for s, _ in expected] + [len(rows) * width]
    assert seg.cu_seqlens.dtype == torch.int32
    assert seg.max_len == max(e - s for s, e in expected)
    # The same cuts as Hugging Face's packed-sequence detection.
    hf = find_packed_sequence_indices(pos)
    ids = hf if hf is not None else torch.zeros_like(pos)
    ours = torch.zeros(pos.numel(), dtype=torch.long)
    for k, (s, e) in enumerate(seg.bounds):
        ours[s:e] = k
    first_of_row = torch.tensor([len([b for b in seg.bounds if b[0] < i * width]) for i in range(len(rows))])
    assert torch.equal(ours.view_as(pos) - first_of_row[:, None], ids)


def test_padding_mask_cuts_and_refusals():
    pos = torch.arange(6)[None].expand(2, -1)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert va.segments(pos, right).bounds == [(0, 4), (4, 6), (6, 12)]
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert va.segments(pos, left).bounds == [(0, 2), (2, 6), (6, 12)]
    hole = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(va.VarlenAttentionError, match="start or end"):
        va.segments(pos, hole)


def test_refuses_dropout_and_softcap():
    q = torch.zeros(1, 2, 4, 8)
    pos = torch.arange(4)[None]
    mod = torch.nn.Module()
    with pytest.raises(va.VarlenAttentionError, match="dropout"):
        va.varlen_attention_forward(mod, q, q, q, None, dropout=0.1, position_ids=pos)
    with pytest.raises(va.VarlenAttentionError, match="soft-capping"):
        va.varlen_attention_forward(mod, q, q, q, None, softcap=30.0, position_ids=pos)


def test_kernel_choice_off_cuda_is_sdpa_per_sequence():
    for dtype in (torch.float32, torch.bfloat16):
        assert va.kernel_for(torch.zeros(1, 2, 4, 8, dtype=dtype)) == "sdpa_per_sequence"


def test_bf16_error_no_larger_than_hf_paths():
    """bf16 on CPU (the dtype GPUs run): against the fp32 pass, varlen's
    error is of the size of Hugging Face's own bf16 paths' (packed, padded)."""
    ref = tiny_qwen3() if (TINY_DIR / "model" / "config.json").is_file() else random_llama()
    seqs = random_seqs(1, 10, ref.config.vocab_size)
    packed, padded = pack_layout(seqs, 64, 0), pad_layout(seqs, 0)
    with torch.no_grad():
        exact = response_logprobs(ref, packed)
        dense = ref.to(torch.bfloat16)
        varlen = with_attention(dense, va.register())
        err = lambda m, lay: float((response_logprobs(m, lay) - exact).abs().max())  # noqa: E731
        hf = max(err(dense, packed), err(dense, padded))
        assert 0 < err(varlen, packed) <= 1.5 * hf + 0.01


def test_implementation_choice():
    assert va.implementation("auto", packing=True) == va.NAME
    assert va.implementation("auto", packing=False) is None
    assert va.implementation("sdpa", packing=True) == "sdpa"
    assert va.implementation("varlen", packing=False) == va.NAME


def largest_allocation(model, layout) -> int:
    """The largest single CPU allocation of a forward and backward (bytes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        response_logprobs(model, layout).sum().backward()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_no_row_sized_mask():
    """A row of 8 sequences x 512 tokens: HF's packed path allocates a
    4096 x 4096 mask (16 MiB as bool); varlen's largest allocation stays
    below it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    dense = LlamaForCausalLM(cfg)
    varlen = with_attention(dense, va.register())
    rng = random.Random(0)
    seqs = [([rng.randrange(1, 64) for _ in range(256)], [rng.randrange(1, 64) for _ in range(256)])
            for _ in range(8)]
    lay = pack_layout(seqs, 4096, 0)
    assert tuple(lay.ids.shape) == (1, 4096)
    width2 = 4096 * 4096
    assert largest_allocation(dense, lay) >= width2
    assert largest_allocation(varlen, lay) < width2


def test_segments_derived_once_per_forward(monkeypatch):
    """Every layer gets the same position_ids: one derivation (one host
    sync) per forward, for packed rows and for [1, width] positions."""
    calls = []
    real = va.segments
    monkeypatch.setattr(va, "segments", lambda *a: calls.append(1) or real(*a))
    from stream_rl.learner.packing import head_gives_logits

    model = with_attention(random_llama(), va.register())  # 2 layers
    seqs = random_seqs(4, 5, 300)
    head_gives_logits(model)  # its own two forwards, once per model
    calls.clear()
    with torch.no_grad():
        response_logprobs(model, pack_layout(seqs, 64, 0))
        assert len(calls) == 1
        response_logprobs(model, pad_layout(seqs, 0))  # HF makes [1, width] position ids
        assert len(calls) == 2


@pytest.mark.parametrize("window", [None, 4])
def test_torch_varlen_call_matches_this_torch(window):
    """The CUDA kernel's call, as far as a CPU host can run it: on meta
    tensors torch runs the op's registered fake kernels, so the call's
    arguments (names, types, GQA head counts) and its autograd wiring are
    checked against this torch's `varlen_attn`; its numbers need a GPU
    (scripts/gpu_check.sh)."""
    pytest.importorskip("torch.nn.attention.varlen")
    seg = va.segments(torch.cat([torch.arange(n) for n in (3, 5, 8)])[None])
    seg = va.Segments(seg.cu_seqlens.to("meta"), seg.bounds, seg.max_len)
    q = torch.empty(16, 4, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.empty(16, 2, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out = va.KERNELS["torch_varlen"](q, kv, kv, seg, 0.125, window)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    dq, dkv = torch.autograd.grad(out.float().sum(), (q, kv))
    assert dq.shape == q.shape and dkv.shape == kv.shape
