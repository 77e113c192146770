"""Variable-length attention for packed rows, registered with Hugging Face's
attention interface as `NAME`.

A packed row holds several sequences whose position ids restart at 0
(`packing.pack_layout`). Hugging Face's sdpa/eager paths turn the restarts
into a dense [width x width] block-causal mask per row, so a row costs its
width squared in memory and time whatever its sequences are. Here the
restarts become sequence boundaries (`cu_seqlens` over the flattened rows,
the form variable-length kernels take), derived once per forward and reused
by every layer, and each sequence attends causally to itself only:

- CUDA, bf16/fp16: torch's own varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`, flash attention inside), else
  flash-attn's `flash_attn_varlen_func` when installed;
- anywhere else (CPU; fp32 on CUDA; a head size the kernels refuse): SDPA
  run per sequence, causal and without a mask, so the cost is the sum of the
  sequences' squares, never the row's.

No mask is ever built over a row: the mask interface under `NAME` is
Hugging Face's flash-attention one, which passes a 2-D padding mask through
(or None) and never expands it. A row's padding tail has restarting
positions too, so it is one more sequence: it attends to itself only and
nothing attends to it. A right- or left-padded batch (2-D mask, no packing)
works the same way: the padding run is a sequence of its own.

GQA (fewer key/value heads than query heads) goes to the kernels as is;
sliding-window layers get the window (a sequence longer than it gets a
banded mask of its own length on the SDPA path). Attention dropout,
logit soft-capping and attention sinks are refused: the learner trains
without dropout, and the others are not implemented here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

NAME = "stream_rl_varlen"


class VarlenAttentionError(ValueError):
    pass


@dataclass(frozen=True)
class Segments:
    """Sequence boundaries over the flattened [rows x width] tokens."""
    cu_seqlens: torch.Tensor  # int32 [n + 1], on the tokens' device
    bounds: list[tuple[int, int]]  # (start, end) of each sequence, host-side
    max_len: int

    @cached_property
    def length_buckets(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The sequences in batches of similar length (within a factor of
        about sqrt 2), for batched SDPA: per batch, `gather` [n, width] the
        token index of each place (past a sequence's end its last token
        again: causal attention never lets a real token see those places),
        `take` the places holding real tokens (flat) and `put` those tokens'
        indices."""
        groups: dict[int, list[tuple[int, int]]] = {}
        for s, e in self.bounds:
            groups.setdefault(math.ceil(2 * math.log2(e - s)), []).append((s, e))
        dev = self.cu_seqlens.device
        out = []
        for key in sorted(groups):
            starts = torch.tensor([s for s, _ in groups[key]], device=dev)
            lens = torch.tensor([e - s for s, e in groups[key]], device=dev)
            j = torch.arange(int(lens.max()), device=dev)
            real = (j[None, :] < lens[:, None]).flatten()
            gather = starts[:, None] + torch.minimum(j[None, :], lens[:, None] - 1)
            out.append((gather, real.nonzero().flatten(), gather.flatten()[real]))
        return out


def segments(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Segments:
    """The sequences of packed rows: a sequence starts at every row's first
    token and wherever the position id is not the previous one plus 1 (the
    rule of Hugging Face's `find_packed_sequence_indices`, so both paths cut
    the same sequences); with a 2-D padding mask, also where the mask
    changes (a padding run is a sequence of its own)."""
    pos = position_ids
    if pos.dim() != 2:
        raise VarlenAttentionError(f"position_ids must be [rows, width]; got shape {tuple(pos.shape)}")
    rows, width = pos.shape
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if attention_mask is not None:
        m = attention_mask.to(torch.bool)
        change = m[:, 1:] != m[:, :-1]
        # Padding at either end only: a padding token between real ones would
        # hide it from the tokens after it, which cutting there cannot express.
        if bool(((change.sum(1) > 1) & m[:, 0] & m[:, -1]).any()) or bool((change.sum(1) > 2).any()):
            raise VarlenAttentionError("varlen attention takes padding at the start or end of a row only")
        start[:, 1:] |= change
    firsts = start.flatten().nonzero().flatten().tolist()  # the one host sync of a forward
    ends = firsts[1:] + [rows * width]
    bounds = list(zip(firsts, ends))
    cu = torch.tensor(firsts + [rows * width], dtype=torch.int32, device=pos.device)
    return Segments(cu, bounds, max(e - s for s, e in bounds))


# Every layer of a forward gets the same position_ids (and mask) tensors:
# their segments are derived at the first layer and kept for the rest. The
# slot holds the tensors themselves, so an id cannot be reused while cached.
_cache: list = [None, None, -1, 0, None]  # position_ids, attention_mask, its _version, rows, Segments


def cached_segments(position_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: int) -> Segments:
    pos, mask, version, n, seg = _cache
    if pos is position_ids and mask is attention_mask and version == position_ids._version and n == rows:
        return seg
    # Models pass [1, width] position ids for rows that are not packed.
    seg = segments(position_ids.expand(rows, -1) if position_ids.shape[0] != rows else position_ids, attention_mask)
    _cache[:] = [position_ids, attention_mask, position_ids._version, rows, seg]
    return seg


def _window(sliding_window: int | None, max_len: int) -> int | None:
    """Hugging Face's sliding window W: a token sees itself and the W - 1
    before it. None when no sequence is longer than it (plain causal)."""
    return sliding_window if sliding_window is not None and sliding_window < max_len else None


def torch_varlen_available(query: torch.Tensor) -> bool:
    """Whether torch's varlen kernel (flash attention) can take this query:
    CUDA, half precision, a head size flash attention has, an Ampere or
    newer GPU, and a torch that has the kernel."""
    if not (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)):
        return False
    d = query.shape[-1]
    if d > 256 or d % 8:
        return False
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attn_available(query: torch.Tensor) -> bool:
    if not (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)) or query.shape[-1] > 256:
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_for(query: torch.Tensor) -> str:
    """Which implementation runs a query: "torch_varlen", "flash_attn" or
    "sdpa_per_sequence"."""
    if torch_varlen_available(query):
        return "torch_varlen"
    if flash_attn_available(query):
        return "flash_attn"
    return "sdpa_per_sequence"


def _torch_varlen(q, k, v, seg: Segments, scale, window):
    from torch.nn.attention.varlen import varlen_attn

    # (-1, 0) is causal; (W - 1, 0) causal within the window. A tuple: the
    # function tests `window_size == (-1, 0)` for causality.
    ws = (-1, 0) if window is None else (window - 1, 0)
    return varlen_attn(q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, scale=scale,
                       window_size=ws, enable_gqa=k.shape[1] != q.shape[1])


def _flash_attn(q, k, v, seg: Segments, scale, window):
    from flash_attn import flash_attn_varlen_func

    ws = (-1, -1) if window is None else (window - 1, 0)
    return flash_attn_varlen_func(q, k, v, seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len,
                                  dropout_p=0.0, softmax_scale=scale, causal=True, window_size=ws)


def _sdpa_per_sequence(q, k, v, seg: Segments, scale, window):
    """SDPA on each sequence alone, causal, no mask: sequences of similar
    length go through one call as a batch (`Segments.length_buckets`),
    since one call per sequence cost more than HF's dense mask on rows of
    many short sequences (measured on CPU, docs/gpus.md)."""
    gqa = k.shape[1] != q.shape[1]
    pieces, puts = [], []
    for gather, take, put in seg.length_buckets:
        n, width = gather.shape
        qs, ks, vs = (t[gather].transpose(1, 2) for t in (q, k, v))  # [n, heads, width, head_dim]
        if window is not None and width > window:
            i = torch.arange(width, device=q.device)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)  # the bucket's width, not the row's
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band, scale=scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        pieces.append(o.transpose(1, 2).reshape(n * width, *o.shape[1:2], o.shape[-1])[take])
        puts.append(put)
    # Every token is in exactly one sequence: the pieces cover the output.
    return q.new_zeros(q.shape).index_copy(0, torch.cat(puts), torch.cat(pieces))


KERNELS = {"torch_varlen": _torch_varlen, "flash_attn": _flash_attn, "sdpa_per_sequence": _sdpa_per_sequence}


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, softcap: float | None = None,
                             position_ids: torch.Tensor | None = None, kernel: str | None = None, **kwargs):
    """Hugging Face's attention-function signature: query [rows, heads,
    width, head_dim], key/value [rows, kv_heads, width, head_dim]; returns
    ([rows, width, heads, head_dim], None). `kernel` forces one of `KERNELS`
    (tests compare them); by default `kernel_for` picks."""
    rows, heads, width, dim = query.shape
    if dropout:
        raise VarlenAttentionError(f"varlen attention runs without attention dropout; this model asks for "
                                   f"{dropout} (set the model config's attention_dropout to 0)")
    if softcap is not None or kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise VarlenAttentionError("varlen attention does not implement logit soft-capping or attention sinks; "
                                   "use learner.attention = \"sdpa\" for this model")
    if key.shape[2] != width:
        raise VarlenAttentionError("varlen attention is for full forward passes without a KV cache "
                                   f"(queries {width}, keys {key.shape[2]})")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise VarlenAttentionError(f"varlen attention takes a 2-D padding mask or none; got "
                                   f"{attention_mask.dim()}-D")
    if position_ids is None:
        raise VarlenAttentionError(f"{type(module).__name__} does not pass position_ids to its attention "
                                   "function, which varlen attention cuts sequences by")
    seg = cached_segments(position_ids, attention_mask, rows)
    window = _window(sliding_window, seg.max_len)
    flat = lambda t: t.transpose(1, 2).reshape(rows * width, t.shape[1], dim)  # noqa: E731
    run = KERNELS[kernel or kernel_for(query)]
    out = run(flat(query), flat(key), flat(value), seg, scaling, window)
    return out.view(rows, width, heads, dim), None


def register() -> str:
    """Register `NAME` with Hugging Face's attention and mask interfaces
    (idempotent); returns the name to load a model with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    # The flash-attention mask: None, or the 2-D padding mask as it is.
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME


def implementation(attention: str, packing: bool) -> str | None:
    """The attn_implementation a learner loads its model with for
    `learner.attention`: "auto" is varlen when packing and the model's
    default otherwise (None)."""
    if attention == "auto":
        attention = "varlen" if packing else None
    if attention == "varlen":
        return register()
    return attention
