"""Group advantages, the GRPO/DAPO/GSPO losses and the learner's batching helpers.

Losses are checked against an independent scalar computation written with
plain Python loops and `math` (ALGORITHMS.md §1), not against torch code.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stream_rl.learner.advantages import group_advantages, ht_group_advantages
from stream_rl.learner.losses import policy_loss
from stream_rl.learner.samples import Sample, samples_from_groups
from stream_rl.learner.trainer import micro_batches, pad_batch
from stream_rl.protocol import Group, Rollout

EPS = 1e-6


# --- group advantages -----------------------------------------------------------------

def test_advantages_hand_computed_binary():
    # mean = 0.5; unbiased var = 4 * 0.25 / 3 = 1/3; std = sqrt(1/3) ~ 0.57735
    std = math.sqrt(1 / 3)
    expected = [0.5 / (std + EPS), -0.5 / (std + EPS), -0.5 / (std + EPS), 0.5 / (std + EPS)]
    assert group_advantages([1.0, 0.0, 0.0, 1.0], EPS) == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(0.8660254, rel=1e-5)  # sqrt(3)/2


def test_advantages_hand_computed_three():
    # rewards 1, 2, 6: mean 3; deviations -2, -1, 3; var = (4 + 1 + 9) / 2 = 7
    std = math.sqrt(7)
    got = group_advantages([1.0, 2.0, 6.0], eps=0.0)
    assert got == pytest.approx([-2 / std, -1 / std, 3 / std], rel=1e-12)


def test_advantages_use_eps():
    got = group_advantages([0.0, 2.0], eps=0.5)  # mean 1, std sqrt(2)
    assert got == pytest.approx([-1 / (math.sqrt(2) + 0.5), 1 / (math.sqrt(2) + 0.5)])


@pytest.mark.parametrize("rewards", [[1.0] * 8, [0.0, 0.0], [0.3] * 3])
def test_all_equal_rewards_give_zero(rewards):
    assert group_advantages(rewards) == [0.0] * len(rewards)


def test_single_and_empty():
    assert group_advantages([0.7]) == [0.0]
    assert group_advantages([]) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_raises(bad):
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages([1.0, bad, 0.0])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=16))
def test_advantages_are_centered_and_unit_std(rewards):
    std_r = math.sqrt(sum((r - sum(rewards) / len(rewards)) ** 2 for r in rewards) / (len(rewards) - 1))
    assume(std_r > 1e-3)
    adv = group_advantages(rewards, EPS)
    n = len(adv)
    mean = sum(adv) / n
    assert abs(sum(adv)) < 1e-6
    std_a = math.sqrt(sum((a - mean) ** 2 for a in adv) / (n - 1))
    assert std_a == pytest.approx(std_r / (std_r + EPS), rel=1e-9)
    assert std_a == pytest.approx(1.0, abs=1e-3)
    # Order is preserved: a higher reward never gets a lower advantage.
    for (r1, a1), (r2, a2) in zip(sorted(zip(rewards, adv)), sorted(zip(rewards, adv))[1:]):
        assert a1 <= a2 + 1e-12


# --- reference losses (plain Python) --------------------------------------------------------

def _surrogate(ratio: float, adv: float, lo: float, hi: float) -> tuple[float, bool, float]:
    """-min(rA, clip(r)A), whether the clipped branch won, and d(loss)/d(log r)."""
    clipped_r = min(max(ratio, 1 - lo), 1 + hi)
    unclipped, clipped = ratio * adv, clipped_r * adv
    if clipped < unclipped:
        return -clipped, True, 0.0  # constant in the ratio: no gradient
    return -unclipped, False, -ratio * adv


def ref_loss(kind, logp, old, adv, mask, lo, hi, num_seqs, num_tokens):
    """(loss, clipped token count, d loss / d logp) by explicit loops."""
    B, T = len(logp), len(logp[0])
    grad = [[0.0] * T for _ in range(B)]
    total, n_clipped = 0.0, 0
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        if kind == "gspo":
            mean_lr = sum(logp[i][t] - old[i][t] for t in toks) / max(len(toks), 1)
            val, was_clipped, g = _surrogate(math.exp(mean_lr), adv[i], lo, hi)
            total += val / num_seqs
            n_clipped += len(toks) if was_clipped else 0
            for t in toks:
                grad[i][t] = g / max(len(toks), 1) / num_seqs
            continue
        seq_sum = 0.0
        for t in toks:
            val, was_clipped, g = _surrogate(math.exp(logp[i][t] - old[i][t]), adv[i], lo, hi)
            seq_sum += val
            n_clipped += was_clipped
            grad[i][t] = g / max(len(toks), 1) / num_seqs if kind == "grpo" else g / num_tokens
        total += seq_sum / max(len(toks), 1) / num_seqs if kind == "grpo" else seq_sum / num_tokens
    return total, n_clipped, grad


def run_loss(kind, logp, old, adv, mask, lo=0.2, hi=0.2, num_seqs=None, num_tokens=None):
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(mask, dtype=torch.bool)
    num_seqs = len(logp) if num_seqs is None else num_seqs
    num_tokens = int(m.sum()) if num_tokens is None else num_tokens
    terms = policy_loss(kind, lp, torch.tensor(old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64),
                        m, clip_low=lo, clip_high=hi, num_seqs=num_seqs, num_tokens=num_tokens)
    terms.loss.backward()
    return terms, lp.grad


KINDS = ["grpo", "dapo", "gspo"]


def test_single_token_hand_values():
    """One token, old log-prob 0, so the ratio is exp(logp): the four clip cases."""
    cases = [  # ratio, advantage, clip_low, clip_high, expected loss, clipped?
        (1.5, 1.0, 0.2, 0.2, -1.2, True),  # above 1+eps, positive A: clipped
        (1.5, 1.0, 0.2, 0.28, -1.28, True),  # clip-higher
        (0.5, 1.0, 0.2, 0.2, -0.5, False),  # below 1-eps, positive A: unclipped (pessimistic)
        (0.5, -1.0, 0.2, 0.2, 0.8, True),  # below 1-eps, negative A: clipped
        (1.5, -1.0, 0.2, 0.2, 1.5, False),  # above 1+eps, negative A: unclipped
        (1.1, 2.0, 0.2, 0.2, -2.2, False),  # inside the range
    ]
    for ratio, adv, lo, hi, expected, was_clipped in cases:
        for kind in KINDS:
            terms, grad = run_loss(kind, [[math.log(ratio)]], [[0.0]], [adv], [[1]], lo, hi)
            assert float(terms.loss.detach()) == pytest.approx(expected), (kind, ratio, adv)
            assert int(terms.clipped_tokens) == int(was_clipped)
            assert float(grad[0, 0]) == pytest.approx(0.0 if was_clipped else -ratio * adv)


def test_grpo_dapo_gspo_differ_in_normalisation():
    """Two sequences of lengths 1 and 3, ratio 1 everywhere: loss is -A per token."""
    logp = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    mask = [[1, 0, 0], [1, 1, 1]]
    adv = [1.0, -1.0]
    # GRPO: seq means (-1, +1) -> mean 0.  DAPO: (-1 + 3) / 4 = 0.5.  GSPO: (-1 + 1) / 2 = 0.
    assert float(run_loss("grpo", logp, logp, adv, mask)[0].loss.detach()) == pytest.approx(0.0)
    assert float(run_loss("dapo", logp, logp, adv, mask)[0].loss.detach()) == pytest.approx(0.5)
    assert float(run_loss("gspo", logp, logp, adv, mask)[0].loss.detach()) == pytest.approx(0.0)


def random_spans(rng: random.Random, B: int, T: int, min_len: int = 0) -> list[list[int]]:
    """A response mask per row: one contiguous span of min_len..T tokens."""
    mask = []
    for _ in range(B):
        n = rng.randint(min_len, T)
        start = rng.randint(0, T - n)
        mask.append([1 if start <= t < start + n else 0 for t in range(T)])
    return mask


def random_batch(rng: random.Random, B: int, T: int):
    logp = [[rng.uniform(-3, 0) for _ in range(T)] for _ in range(B)]
    # Ratios spread from ~0.5 to ~2 so both clip sides are exercised.
    old = [[x + rng.uniform(-0.7, 0.7) for x in row] for row in logp]
    adv = [rng.uniform(-2, 2) for _ in range(B)]
    return logp, old, adv, random_spans(rng, B, T)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lo,hi", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
@pytest.mark.parametrize("seed", range(4))
def test_loss_matches_reference(kind, lo, hi, seed):
    rng = random.Random(seed)
    logp, old, adv, mask = random_batch(rng, B=5, T=7)
    mask[0] = [0] * 7  # a fully padded row contributes nothing
    terms, grad = run_loss(kind, logp, old, adv, mask, lo, hi)
    n_tok = sum(map(sum, mask))
    want, want_clipped, want_grad = ref_loss(kind, logp, old, adv, mask, lo, hi, 5, n_tok)
    assert float(terms.loss.detach()) == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert int(terms.clipped_tokens) == want_clipped
    assert int(terms.tokens) == n_tok
    for got_row, want_row in zip(grad.tolist(), want_grad):
        assert got_row == pytest.approx(want_row, rel=1e-9, abs=1e-12)


def test_reference_batches_exercise_both_clip_sides():
    # Guard for the test above: its data really hits clipped and unclipped
    # tokens with either sign of advantage.
    seen = set()
    for seed in range(4):
        logp, old, adv, mask = random_batch(random.Random(seed), 5, 7)
        for i in range(5):
            for t in range(7):
                if mask[i][t]:
                    r = math.exp(logp[i][t] - old[i][t])
                    seen.add((adv[i] > 0, r > 1.2, r < 0.8))
    assert {(True, True, False), (True, False, True), (False, True, False), (False, False, True)} <= seen


@settings(max_examples=60, deadline=None)
@given(data=st.data(), kind=st.sampled_from(KINDS))
def test_loss_matches_reference_property(data, kind):
    B = data.draw(st.integers(1, 4))
    T = data.draw(st.integers(1, 5))
    vals = st.floats(-3, 0, allow_nan=False)
    logp = [data.draw(st.lists(vals, min_size=T, max_size=T)) for _ in range(B)]
    old = [data.draw(st.lists(vals, min_size=T, max_size=T)) for _ in range(B)]
    adv = data.draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=B, max_size=B))
    mask = [data.draw(st.lists(st.sampled_from([0, 1]), min_size=T, max_size=T)) for _ in range(B)]
    lo = data.draw(st.floats(0.0, 0.5))
    hi = data.draw(st.floats(0.0, 0.5))
    n_tok = max(sum(map(sum, mask)), 1)
    terms, _ = run_loss(kind, logp, old, adv, mask, lo, hi, num_tokens=n_tok)
    want, _, _ = ref_loss(kind, logp, old, adv, mask, lo, hi, B, n_tok)
    assert float(terms.loss.detach()) == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [1, 3, 5])
def test_micro_batches_sum_to_full_batch(kind, split):
    rng = random.Random(7)
    logp, old, adv, mask = random_batch(rng, B=6, T=6)
    n_tok = sum(map(sum, mask))
    full, full_grad = run_loss(kind, logp, old, adv, mask, 0.2, 0.28, num_seqs=6, num_tokens=n_tok)
    parts = [slice(0, split), slice(split, 6)]
    total, grads = 0.0, []
    for s in parts:
        t, g = run_loss(kind, logp[s], old[s], adv[s], mask[s], 0.2, 0.28, num_seqs=6, num_tokens=n_tok)
        total += float(t.loss.detach())
        grads.append(g)
    assert total == pytest.approx(float(full.loss.detach()), rel=1e-12, abs=1e-15)
    assert torch.allclose(torch.cat(grads), full_grad, rtol=1e-12, atol=1e-15)


def test_float_mask_same_as_bool_mask():
    logp, old, adv, mask = random_batch(random.Random(3), 4, 5)
    for kind in KINDS:
        args = (torch.tensor(logp), torch.tensor(old), torch.tensor(adv))
        a = policy_loss(kind, *args, torch.tensor(mask, dtype=torch.bool), clip_low=0.2, clip_high=0.2,
                        num_seqs=4, num_tokens=10)
        b = policy_loss(kind, *args, torch.tensor(mask, dtype=torch.float32), clip_low=0.2, clip_high=0.2,
                        num_seqs=4, num_tokens=10)
        assert torch.equal(a.loss, b.loss)


def test_unknown_loss_kind():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ppo"):
        policy_loss("ppo", z, z, torch.zeros(1), torch.ones(1, 2), clip_low=0.2, clip_high=0.2,
                    num_seqs=1, num_tokens=2)


# --- samples_from_groups ---------------------------------------------------------------------

def rollout(rid: str, reward, response=(5, 6), logprobs="auto", group="g") -> Rollout:
    r = Rollout(rollout_id=rid, group_id=group, prompt_ids=[1, 2], answer="0", max_tokens=64)
    r.response_ids = list(response)
    r.logprobs = [-0.5] * len(response) if logprobs == "auto" else logprobs
    r.versions = [0] * len(response)
    r.finish_reason, r.reward = "stop", reward
    return r


def group(gid: str, rewards, **kw) -> Group:
    return Group(group_id=gid, rollouts=[rollout(f"{gid}-{i}", r, group=gid, **kw) for i, r in enumerate(rewards)])


@pytest.mark.parametrize("correction", ["ht", "none"])
def test_samples_carry_group_advantages_in_order(correction):
    g1, g2 = group("a", [1.0, 0.0, 0.0, 1.0]), group("b", [0.0, 1.0])
    for scale in (False, True):
        batch = samples_from_groups([g1, g2], EPS, drop_zero_variance=False, correction=correction, scale=scale)
        samples = batch.samples
        assert batch.dropped_groups == 0 and batch.rejected == [] and batch.members == 6
        assert len(samples) == 6
        # Nothing pruned: both corrections give the plain group advantages.
        assert [s.advantage for s in samples] == pytest.approx(
            group_advantages([1.0, 0.0, 0.0, 1.0], EPS, scale) + group_advantages([0.0, 1.0], EPS, scale))
    # The default is the unscaled (Dr. GRPO) form, the one pruning cannot bias.
    assert [s.advantage for s in samples_from_groups([g1], EPS, False).samples] == [0.5, -0.5, -0.5, 0.5]
    r = g1.rollouts[0]
    assert samples[0].prompt_ids == r.prompt_ids and samples[0].response_ids == r.response_ids
    assert samples[0].rollout_logprobs == r.logprobs and samples[0].versions == r.versions


def test_zero_variance_groups_dropped_and_counted():
    groups = [group("a", [1.0, 1.0]), group("b", [0.0, 1.0]), group("c", [0.0, 0.0])]
    batch = samples_from_groups(groups, EPS, drop_zero_variance=True, scale=True)
    samples = batch.samples
    assert batch.dropped_groups == 2 and batch.members == 2  # dropped groups leave the normaliser
    assert len(samples) == 2
    assert [s.advantage for s in samples] == pytest.approx(group_advantages([0.0, 1.0], EPS))


def test_zero_variance_groups_kept_with_zero_advantage_when_not_dropping():
    batch = samples_from_groups([group("a", [1.0, 1.0, 1.0])], EPS, drop_zero_variance=False)
    samples, dropped = batch.samples, batch.dropped_groups
    assert dropped == 0
    assert [s.advantage for s in samples] == [0.0, 0.0, 0.0]


def test_missing_logprobs_allowed():
    samples = samples_from_groups([group("a", [0.0, 1.0], logprobs=None)], EPS, False).samples
    assert all(s.rollout_logprobs is None for s in samples)


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("bad,why", [
    (dict(response=()), "empty response"),
    (dict(reward=float("nan")), "reward nan"),
    (dict(reward=None), "reward None"),
    (dict(reward=float("inf")), "reward inf"),
    (dict(logprobs=[-0.1]), "1 logprobs for 2 tokens"),
])
def test_bad_sample_is_left_out_by_name_and_nothing_else_is_lost(bad, why, drop):
    g = group("grp", [1.0, 0.0, 1.0])
    kw = dict(reward=1.0)
    kw.update(bad)
    g.rollouts[1] = rollout("grp-bad", group="grp", **kw)
    other = group("ok", [0.0, 1.0])
    batch = samples_from_groups([g, other], EPS, drop_zero_variance=drop)
    assert len(batch.rejected) == 1 and "grp-bad" in batch.rejected[0] and why in batch.rejected[0]
    # The bad rollout's group mates and the other group all train; the
    # baseline is over the valid members (both reward 1: zero advantage).
    assert {s.sample_id for s in batch.samples} == ({"ok-0", "ok-1"} if drop else {"grp-0", "grp-2", "ok-0", "ok-1"})
    assert all(s.advantage == 0.0 for s in batch.samples if s.group_id == "grp")


# --- micro_batches and pad_batch ---------------------------------------------------------------------

def sample(prompt_len: int, response_len: int) -> Sample:
    return Sample(list(range(1, prompt_len + 1)), list(range(100, 100 + response_len)), 0.0, None,
                  [0] * response_len)


@settings(max_examples=100, deadline=None)
@given(lens=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 30)), max_size=30),
       budget=st.integers(1, 200))
def test_micro_batches_respect_budget_and_keep_every_sample(lens, budget):
    samples = [sample(p, r) for p, r in lens]
    batches = micro_batches(samples, budget)
    flat = [s for b in batches for s in b]
    assert sorted(map(id, flat)) == sorted(map(id, samples))  # each exactly once
    assert all(batches)  # no empty batches
    for b in batches:
        padded = len(b) * max(len(s.prompt_ids) + len(s.response_ids) for s in b)
        assert padded <= budget or len(b) == 1
    if samples:
        # A large enough budget yields one batch.
        assert len(micro_batches(samples, 10_000)) == 1


def test_pad_layout():
    a, b = sample(2, 3), sample(3, 1)
    ids, attn, mask = pad_batch([a, b], pad_id=0)
    assert ids.tolist() == [[1, 2, 100, 101, 102], [1, 2, 3, 100, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # mask[t] marks positions whose *next* token is a response token.
    assert mask.tolist() == [[False, True, True, True], [False, False, True, False]]
    # Row-major mask order gives the response tokens in sample order (the
    # trainer relies on it when it scatters stored old log-probs).
    assert ids[:, 1:][mask].tolist() == a.response_ids + b.response_ids


def pruned_group() -> Group:
    """Four members; the second pruned; the survivors kept with 0.5, 1 and 0.25."""
    g = group("p", [1.0, 0.0, 0.0, 1.0])
    g.rollouts[1].finish_reason, g.rollouts[1].reward = "pruned", None
    for r, p in zip(g.rollouts, [0.5, 0.4, 1.0, 0.25]):
        r.keep_prob = p
    return g


def test_pruned_members_are_not_samples_and_uncorrected_baseline_is_the_survivors():
    batch = samples_from_groups([pruned_group()], EPS, drop_zero_variance=False, correction="none", scale=True)
    samples = batch.samples
    assert batch.dropped_groups == 0 and len(samples) == 3 and batch.members == 4
    assert all(s.group_size == 4 for s in samples)  # N before pruning
    assert [s.inclusion for s in samples] == [0.5, 1.0, 0.25]
    assert [s.advantage for s in samples] == pytest.approx(group_advantages([1.0, 0.0, 1.0], EPS))


def test_pruned_group_ht_baseline_by_hand():
    # Survivors R = 1, 0, 1 with p = 0.5, 1, 0.25; N = 4. HT sum = 2 + 0 + 4 = 6.
    # A_0 = 1 - (1 + 6 - 2) / 4 = -0.25; A_2 = 0 - (0 + 6 - 0) / 4 = -1.5; A_3 = 1 - (1 + 6 - 4) / 4 = 0.25.
    samples = samples_from_groups([pruned_group()], EPS, drop_zero_variance=False).samples
    assert [s.advantage for s in samples] == pytest.approx([-0.25, -1.5, 0.25], rel=1e-12)
    assert ht_group_advantages([1.0, 0.0, 1.0], [0.5, 1.0, 0.25], 4) == pytest.approx([-0.25, -1.5, 0.25])


def test_truncated_survivor_leaves_the_loss_but_not_the_baseline_or_the_members():
    g = group("t", [1.0, 0.0, 1.0, 0.0])
    g.rollouts[2].finish_reason = "length"
    batch = samples_from_groups([g], EPS, drop_zero_variance=False, mask_truncated=True)
    assert [s.sample_id for s in batch.samples] == ["t-0", "t-1", "t-3"] and batch.members == 4
    assert [s.advantage for s in batch.samples] == [0.5, -0.5, -0.5]
    # A group whose every survivor is masked still counts its members.
    for r in g.rollouts:
        r.finish_reason = "length"
    batch = samples_from_groups([g], EPS, drop_zero_variance=False, mask_truncated=True)
    assert batch.samples == [] and batch.members == 4


def test_unknown_correction_is_refused_by_name():
    with pytest.raises(ValueError, match="pruning_correction"):
        samples_from_groups([group("a", [0.0, 1.0])], EPS, False, correction="dppo")


# --- the Horvitz-Thompson baseline: exact expectations by enumeration ----------------------------------

def _enumerate_draws(n: int, keep_prob):
    """Every outcome of sequential keep draws over members 0..n-1, with its
    probability and each member's recorded inclusion probability (the
    conditional one, given the draws before it): keep_prob(k, kept_so_far)."""
    out = []

    def walk(k, kept, prob, incl):
        if k == n:
            out.append((prob, kept, incl))
            return
        p = keep_prob(k, kept)
        if p > 0:
            walk(k + 1, kept + [k], prob * p, incl + [p])
        if p < 1:
            walk(k + 1, kept, prob * (1 - p), incl + [p])

    walk(0, [], 1.0, [])
    return out


def _expected_weighted_advantages(rewards, keep_prob, scale=False):
    """E[1{i kept} / p_i * A_i] for every member i, exactly."""
    n = len(rewards)
    exp = [0.0] * n
    for prob, kept, incl in _enumerate_draws(n, keep_prob):
        if not kept:
            continue
        advs = ht_group_advantages([rewards[i] for i in kept], [incl[i] for i in kept], n, 0.0, scale)
        for i, a in zip(kept, advs):
            exp[i] += prob * a / incl[i]
    return exp


@settings(max_examples=60, deadline=None)
@given(rewards=st.lists(st.sampled_from([0.0, 1.0, 0.5, 2.0]), min_size=2, max_size=6),
       probs=st.lists(st.floats(0.05, 1.0), min_size=6, max_size=6),
       dependent=st.booleans())
def test_ht_baseline_is_exactly_unbiased(rewards, probs, dependent):
    """Over every pruning outcome, the 1/p-weighted HT advantage of each member
    averages to its unpruned mean-centred advantage R_i - mean R: with
    independent draws, and with each p set by the draws before it (as
    `balance: group` and `min_survivors` do)."""
    n = len(rewards)

    def keep_prob(k, kept):
        p = probs[k]
        if dependent:  # more likely kept when few before it were, certain at a minimum of 1
            p = 1.0 if k == n - 1 and not kept else min(1.0, p * (1.5 if len(kept) < k / 2 else 0.7))
        return p

    mean = sum(rewards) / n
    got = _expected_weighted_advantages(rewards, keep_prob)
    assert got == pytest.approx([r - mean for r in rewards], abs=1e-9)


def test_ht_baseline_with_std_is_biased_and_survivors_mean_too():
    """The std-scaled form and the survivors' own mean, weighted alike, miss
    the unpruned advantages: why "ht" defaults to no std division."""
    rewards, probs = [1.0, 0.0, 0.0, 1.0, 0.0], [0.3, 0.9, 0.8, 0.4, 0.6]
    exp_std = _expected_weighted_advantages(rewards, lambda k, kept: probs[k], scale=True)
    full = group_advantages(rewards, 0.0)
    # Exact expectations: any gap is bias, not noise (here 0.014 of advantages of size ~1).
    assert max(abs(a - b) for a, b in zip(exp_std, full)) > 0.01
    survivors = [0.0] * 5
    for prob, kept, incl in _enumerate_draws(5, lambda k, kept: probs[k]):
        for i, a in zip(kept, group_advantages([rewards[i] for i in kept], 0.0, scale=False)):
            survivors[i] += prob * a / incl[i]
    assert max(abs(a - (r - 0.4)) for a, r in zip(survivors, rewards)) > 0.05


@settings(max_examples=100, deadline=None)
@given(rewards=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=12), scale=st.booleans())
def test_ht_baseline_without_pruning_is_the_group_advantage(rewards, scale):
    assert ht_group_advantages(rewards, [1.0] * len(rewards), len(rewards), EPS, scale) == \
        group_advantages(rewards, EPS, scale)


def test_ht_baseline_refuses_bad_input():
    with pytest.raises(ValueError, match="inclusion"):
        ht_group_advantages([1.0, 0.0], [0.5], 2)
    with pytest.raises(ValueError, match="outside"):
        ht_group_advantages([1.0, 0.0], [0.5, 0.0], 2)
    with pytest.raises(ValueError, match="below"):
        ht_group_advantages([1.0, 0.0], [0.5, 0.5], 1)
    with pytest.raises(ValueError, match="non-finite"):
        ht_group_advantages([1.0, float("nan")], [0.5, 0.5], 3)
