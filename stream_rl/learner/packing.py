"""How samples become model inputs: padded rows or densely packed rows.

Either layout gives the log-prob of every response token as one flat vector
in sample order (`ResponseTokens`), so the losses never see the layout.

Packing puts several sequences in one row with position ids that restart at
0 for each; with no 2-D attention mask, Hugging Face models build a
block-causal mask from those restarts (`masking_utils.find_packed_sequence_indices`),
so no token attends across sequences. Rows are filled first-fit-decreasing
to a row width, so the forward pass costs the surviving tokens, not the
padding up to the longest sequence. Rows are kept moderate (`row_tokens`),
not one row per micro-batch: under HF's sdpa/eager attention a row costs
its width squared; under varlen attention (`varlen_attention`, the
learner's default when packing) the sum of its sequences' squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Layout:
    """Model inputs for some sequences, and where their response tokens sit."""
    ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor | None  # [rows, width] when padded; None when packed
    position_ids: torch.Tensor | None  # [rows, width] when packed
    # Response token k of sequence j is predicted at logits[row, col] (and is
    # ids[row, col + 1]); flat, sequences in order, tokens in order.
    rows: torch.Tensor
    cols: torch.Tensor
    lengths: list[int]  # response tokens per sequence
    real_tokens: int  # prompt + response tokens, padding excluded

    @property
    def padding_fraction(self) -> float:
        total = self.ids.numel()
        return 1.0 - self.real_tokens / total if total else 0.0

    def to(self, device) -> "Layout":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Layout(move(self.ids), move(self.attention_mask), move(self.position_ids), move(self.rows),
                      move(self.cols), self.lengths, self.real_tokens)


def _targets(starts: list[tuple[int, int]], seqs: list[tuple[list[int], list[int]]]):
    rows, cols = [], []
    for (row, offset), (prompt, response) in zip(starts, seqs):
        first = offset + len(prompt) - 1  # position predicting response token 0
        rows += [row] * len(response)
        cols += range(first, first + len(response))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def pad_layout(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> Layout:
    """One right-padded row per (prompt_ids, response_ids)."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
    rows, cols = _targets([(i, 0) for i in range(len(seqs))], seqs)
    return Layout(ids, attn, None, rows, cols, [len(r) for _, r in seqs], int(attn.sum()))


def pack_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of sequences per row, first-fit decreasing: every row holds at
    most `budget` tokens, except a row holding one sequence longer than it.

    Rows share one width (the fullest row's), so a nearly empty last row
    would be padded to it: among budgets from the even share total/rows up
    to `budget`, the smallest that needs no more rows is used."""
    rows = _first_fit_decreasing(lengths, budget)
    if len(rows) > 1:
        width = max(sum(lengths[i] for i in r) for r in rows)
        low = max(max(lengths), -(-sum(lengths) // len(rows)))
        for b in range(low, width, max(1, (width - low) // 16)):
            tighter = _first_fit_decreasing(lengths, b)
            if len(tighter) <= len(rows):
                return tighter  # every row within b < width
    return rows


def _first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for k, room in enumerate(free):
            if n <= room:
                rows[k].append(i)
                free[k] -= n
                break
        else:
            rows.append([i])
            free.append(max(budget - n, 0))
    return rows


def pack_layout(seqs: list[tuple[list[int], list[int]]], row_tokens: int, pad_id: int) -> Layout:
    """Sequences packed into rows of up to `row_tokens` tokens (or the
    longest sequence); the flat response tokens keep the input order."""
    lengths = [len(p) + len(r) for p, r in seqs]
    groups = pack_rows(lengths, max(row_tokens, max(lengths)))
    width = max(sum(lengths[i] for i in g) for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    starts: list[tuple[int, int]] = [(0, 0)] * len(seqs)
    for row, g in enumerate(groups):
        offset = 0
        for i in g:
            p, r = seqs[i]
            n = lengths[i]
            ids[row, offset: offset + n] = torch.tensor(p + r)
            pos[row, offset: offset + n] = torch.arange(n)
            starts[i] = (row, offset)
            offset += n
        # The padding tail is one more sequence of its own (positions restart),
        # so it attends only to itself and nothing attends to it.
        pos[row, offset:] = torch.arange(width - offset)
    rows, cols = _targets(starts, seqs)
    return Layout(ids, None, pos, rows, cols, [len(r) for _, r in seqs], sum(lengths))


def head_gives_logits(model) -> bool:
    """Whether the output layer on the backbone's last hidden state gives
    the logits the model's own forward does. Some models do more there
    (Gemma's soft-capping, Cohere's logit scale, Granite's logits_scaling,
    and whatever a remote-code model adds): checked once per model on a
    short input, and remembered."""
    known = getattr(model, "_stream_rl_head_gives_logits", None)
    if known is not None:
        return known
    backbone, head = getattr(model, "base_model", None), model.get_output_embeddings()
    same = backbone is not None and backbone is not model and head is not None
    if same:
        vocab = head.weight.shape[0]
        ids = (torch.arange(1, 9, device=head.weight.device) % vocab)[None]
        was_training = model.training
        model.eval()  # no dropout between the two passes
        try:
            with torch.no_grad():
                full = model(input_ids=ids, use_cache=False).logits.float()
                mine = head(backbone(input_ids=ids, use_cache=False).last_hidden_state).float()
        finally:
            model.train(was_training)
        same = full.shape == mine.shape and bool(torch.allclose(full, mine, rtol=1e-3,
                                                                 atol=1e-3 * float(full.abs().max()) + 1e-6))
    model._stream_rl_head_gives_logits = same
    return same


def response_logprobs(model, layout: Layout) -> torch.Tensor:
    """log π(response token) for every response token of the layout, flat.

    The output layer runs on the response positions only: the full
    [rows, width, vocab] logits of a 150k-vocabulary model would be the
    memory peak of the pass. A model whose logits are more than the output
    layer of its last hidden state (`head_gives_logits`) takes its own
    forward."""
    kw = dict(input_ids=layout.ids, attention_mask=layout.attention_mask, position_ids=layout.position_ids,
              use_cache=False)  # with a cache, HF does not look for packed sequences
    if head_gives_logits(model):
        hidden = model.base_model(**kw).last_hidden_state[layout.rows, layout.cols]
        logits = model.get_output_embeddings()(hidden).float()
    else:
        logits = model(**kw).logits[layout.rows, layout.cols].float()
    target = layout.ids[layout.rows, layout.cols + 1]
    return logits.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(logits, -1)


def split_by_budget(lengths: list[int], budget: int, packing: bool, row_tokens: int) -> list[list[int]]:
    """Micro-batches (sample indices) whose forward pass stays within
    `budget` tokens. Packed: rows of `row_tokens` (or the longest sequence)
    from `pack_rows`, as many rows a micro-batch as the budget holds; padded:
    length-sorted groups whose padded size stays within it."""
    if not lengths:
        return []
    if packing:
        width = max(row_tokens, max(lengths))
        rows = pack_rows(lengths, width)
        per = max(1, budget // width)
        return [sorted(i for g in rows[k:k + per] for i in g) for k in range(0, len(rows), per)]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    return batches
