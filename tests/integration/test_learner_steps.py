"""The learner on the real tiny model: packed and padded layouts agree, and
`Learner.step` end to end (packing on/off, `ht` with inclusion 1 vs `none`,
`mask_stale`, stats). The engine-free parts of the corrections are in
`tests/unit/learner/test_corrections.py`."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from tests.conftest import cfg_with

from stream_rl.learner.advantages import group_advantages
from stream_rl.learner.packing import Layout, pack_layout, pad_layout, response_logprobs
from stream_rl.learner.samples import Sample
from stream_rl.learner.trainer import Learner

KINDS = ["grpo", "dapo", "gspo"]


# Tiny tensors: on a busy 2-core machine intra-op threads made a 500-element
# op take ~10 ms instead of ~30 us.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# === packing ==================================================================================

@pytest.fixture(scope="module")
def tiny_model(engine_cfg):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(engine_cfg.model.path, dtype=torch.float32)
    return model.eval()


def random_seqs(seed: int, n: int = 7):
    rng = random.Random(seed)
    return [([rng.randint(1, 258) for _ in range(rng.randint(2, 12))],
             [rng.randint(1, 258) for _ in range(rng.randint(1, 10))]) for _ in range(n)]


@pytest.mark.parametrize("row_tokens", [1, 24, 4096])
def test_packed_and_padded_logprobs_agree(tiny_model, row_tokens):
    seqs = random_seqs(0)
    with torch.no_grad():
        pad = response_logprobs(tiny_model, pad_layout(seqs, 0))
        lay = pack_layout(seqs, row_tokens, 0)
        packed = response_logprobs(tiny_model, lay)
    assert pad.shape == packed.shape == (sum(len(r) for _, r in seqs),)
    assert torch.allclose(pad, packed, atol=1e-4), (pad - packed).abs().max()
    if row_tokens == 24:  # several sequences share a row
        assert lay.ids.shape[0] < len(seqs)
    # Each sequence alone (no padding, no packing) agrees too.
    with torch.no_grad():
        alone = torch.cat([response_logprobs(tiny_model, pad_layout([s], 0)) for s in seqs])
    assert torch.allclose(alone, pad, atol=1e-4)


def test_packed_without_position_ids_differs(tiny_model):
    """The check above can fail: the same packed ids with plain causal
    attention across the row (no position ids) give other log-probs."""
    seqs = random_seqs(0)
    lay = pack_layout(seqs, 4096, 0)  # one row
    assert lay.ids.shape[0] == 1
    plain = Layout(lay.ids, None, None, lay.rows, lay.cols, lay.lengths, lay.real_tokens)
    with torch.no_grad():
        pad = response_logprobs(tiny_model, pad_layout(seqs, 0))
        wrong = response_logprobs(tiny_model, plain)
    assert (pad - wrong).abs().max() > 1e-2


# === Learner.step end to end ===================================================================

def learner_samples(seed: int = 0, groups: int = 2, size: int = 4, versions: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        advs = group_advantages([1, 0, 1, 0, 0, 1, 1, 0][:size])
        for j in range(size):
            p = [rng.randint(1, 258) for _ in range(rng.randint(3, 9))]
            r = [rng.randint(1, 258) for _ in range(rng.randint(2, 12))]
            out.append(Sample(p, r, advs[j], [rng.uniform(-6, -4) for _ in r], [versions] * len(r),
                              inclusion=1.0, group_id=f"g{g}", sample_id=f"g{g}-{j}", group_size=size))
    return out


def make_learner(engine_cfg, sgd: bool = False, sgd_lr: float = 1.0, **changes):
    # Every learner knob these tests rely on, set here: configs/tiny.yaml's own may change.
    base = dict(pruner__mode="none", learner__packing=False, learner__pack_row_tokens=24, learner__lr=1e-3,
                learner__loss="grpo", learner__micro_batch_tokens=16384, learner__device="cpu",
                learner__offpolicy="none", learner__pruning_correction="none", learner__kl_beta=0.0,
                learner__minibatches=1, learner__dppo_completion_rate=0.0, learner__weight_decay=0.0,
                learner__grad_clip=1.0, learner__clip_low=0.2, learner__clip_high=0.2, learner__adam_eps=1e-8,
                learner__mask_truncated=False)
    base.update(changes)
    learner = Learner(cfg_with(engine_cfg, **base))
    if sgd:  # the update is then -lr * (clipped) gradient: a sensitive comparison
        learner.opt = torch.optim.SGD(learner.model.parameters(), lr=sgd_lr)
    return learner


def params(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.named_parameters()}


class Delta(dict):
    """Per-parameter updates, with the float spacing (ulp) of each
    parameter's largest value: an update is only known to that spacing (a
    norm weight near 1.5 moves in steps of 1.2e-7 in float32)."""

    def __init__(self, before, after):
        super().__init__({k: after[k] - before[k] for k in before})
        self.ulp = {k: float(torch.finfo(v.dtype).eps * v.abs().max()) for k, v in before.items()}


def step_delta(learner, samples, **kw):
    before = params(learner)
    stats = learner.step(samples, **kw)
    return stats, Delta(before, params(learner))


def assert_same_update(a, b, atol):
    for k in a:
        tol = atol + 2 * getattr(a, "ulp", {}).get(k, 0.0)
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("loss", KINDS)
@pytest.mark.parametrize("sgd", [False, True], ids=["adamw", "sgd"])
def test_step_packing_on_off_same_update(engine_cfg, loss, sgd):
    samples = learner_samples(0)
    # AdamW's first step is lr * g / (|g| + eps): with eps 1e-8 a coordinate whose
    # gradient is ~1e-8 turns float noise into an O(lr) difference; eps 1e-4
    # keeps the update Lipschitz in g (constant lr / eps = 10).
    common = dict(learner__loss=loss, learner__grad_clip=1e6, learner__micro_batch_tokens=40,
                  learner__adam_eps=1e-4)
    s_off, d_off = step_delta(make_learner(engine_cfg, sgd=sgd, learner__packing=False, **common), samples)
    s_on, d_on = step_delta(make_learner(engine_cfg, sgd=sgd, learner__packing=True, **common), samples)
    assert s_on["loss"] == pytest.approx(s_off["loss"], abs=1e-5)
    assert s_on["grad_norm"] == pytest.approx(s_off["grad_norm"], rel=1e-4)
    assert s_off["grad_norm"] > 0
    assert_same_update(d_on, d_off, atol=1e-5)
    assert 0.0 <= s_on["padding_fraction"] < 1.0 and 0.0 <= s_off["padding_fraction"] < 1.0


@pytest.mark.parametrize("loss,minibatches", [("grpo", 1), ("dapo", 1), ("gspo", 1), ("dapo", 2)])
def test_step_ht_with_inclusion_one_equals_none(engine_cfg, loss, minibatches):
    samples = learner_samples(1)
    kw = dict(learner__loss=loss, learner__grad_clip=1e6, learner__minibatches=minibatches)
    s_n, d_n = step_delta(make_learner(engine_cfg, sgd=True, **kw), samples)
    s_h, d_h = step_delta(make_learner(engine_cfg, sgd=True, learner__pruning_correction="ht", **kw), samples)
    assert s_h["loss"] == pytest.approx(s_n["loss"], rel=1e-6, abs=1e-9)
    assert s_h["ht_weight_max"] == 1.0 and s_h["ht_weight_mean"] == 1.0
    assert_same_update(d_h, d_n, atol=1e-7)


@pytest.mark.parametrize("loss", ["grpo", "gspo"])
def test_step_ht_with_inclusion_one_equals_none_with_minibatches(engine_cfg, loss):
    """With learner.minibatches > 1 each mini-batch holds a slice of every
    group (samples[i::minibatches]); `ht` must count only that slice's share
    of the groups' N, so with every inclusion 1 it equals `none` (2 groups of
    4, 2 mini-batches of 4: N = 4 per mini-batch, not 8)."""
    samples = learner_samples(1)
    kw = dict(learner__loss=loss, learner__grad_clip=1e6, learner__minibatches=2)
    s_n, d_n = step_delta(make_learner(engine_cfg, sgd=True, sgd_lr=1e-3, **kw), samples)
    s_h, d_h = step_delta(make_learner(engine_cfg, sgd=True, sgd_lr=1e-3, learner__pruning_correction="ht", **kw),
                          samples)
    assert s_h["grad_norm"] == pytest.approx(s_n["grad_norm"], rel=1e-5), (s_h["grad_norm"], s_n["grad_norm"])
    assert s_h["loss"] == pytest.approx(s_n["loss"], rel=1e-5, abs=1e-9)
    assert_same_update(d_h, d_n, atol=1e-9)


def test_step_mask_stale_everything_stale_changes_nothing(engine_cfg):
    samples = learner_samples(2, versions=0)
    learner = make_learner(engine_cfg, learner__offpolicy="mask_stale", learner__weight_decay=0.0)
    stats, delta = step_delta(learner, samples, policy_version=2)  # every token lags 2 versions
    assert stats["grad_norm"] == 0.0
    assert all(float(d.abs().max()) == 0.0 for d in delta.values())
    assert stats["offpolicy_token_frac"] == 1.0 and stats["stale_token_frac"] == 1.0
    assert stats["masked_token_frac"] == 1.0
    assert stats["version_lag/0"] == 0.0 and stats["version_lag/2"] == 1.0
    # The same batch, fresh (lag 0): a real update.
    learner2 = make_learner(engine_cfg, learner__offpolicy="mask_stale")
    stats2, delta2 = step_delta(learner2, samples, policy_version=0)
    assert stats2["grad_norm"] > 0 and any(float(d.abs().max()) > 0 for d in delta2.values())
    assert stats2["version_lag/0"] == 1.0 and stats2["offpolicy_token_frac"] == 0.0


def test_step_mask_stale_partly_stale_equals_masking(engine_cfg):
    """Stale tokens of a sample are left out of its loss: the update equals
    the one on the same samples where those tokens cannot count (a lag-0
    batch where the stale samples' advantages are 0 trains only the rest)."""
    fresh = learner_samples(3, versions=1)
    mixed = [dataclasses.replace(s, versions=[0] * len(s.versions)) if k % 2 else s for k, s in enumerate(fresh)]
    _, d_mixed = step_delta(make_learner(engine_cfg, sgd=True, learner__offpolicy="mask_stale",
                                         learner__grad_clip=1e6), mixed, policy_version=1)
    # Reference: the stale samples contribute nothing (advantage 0, ratio 1, no KL), normaliser unchanged.
    zeroed = [dataclasses.replace(s, advantage=0.0) if k % 2 else s for k, s in enumerate(fresh)]
    _, d_ref = step_delta(make_learner(engine_cfg, sgd=True, learner__grad_clip=1e6), zeroed, policy_version=1)
    assert_same_update(d_mixed, d_ref, atol=1e-7)


@pytest.mark.parametrize("offpolicy", ["none", "tis"])
def test_step_stale_policy_mask_leaves_out_tokens_beyond_the_bound(engine_cfg, offpolicy):
    """buffer.stale_policy "mask": tokens more than max_staleness versions
    behind count for nothing, whatever the off-policy correction; the rest
    train as they would. Reference: the same batch where the too-old
    samples' advantages are 0."""
    fresh = learner_samples(3, versions=3)
    mixed = [dataclasses.replace(s, versions=[0] * len(s.versions)) if k % 2 else s for k, s in enumerate(fresh)]
    kw = dict(sgd=True, learner__grad_clip=1e6, learner__offpolicy=offpolicy, buffer__max_staleness=2)
    s_mask, d_mask = step_delta(make_learner(engine_cfg, buffer__stale_policy="mask", **kw), mixed, policy_version=3)
    zeroed = [dataclasses.replace(s, advantage=0.0) if k % 2 else s for k, s in enumerate(fresh)]
    _, d_ref = step_delta(make_learner(engine_cfg, **kw), zeroed, policy_version=3)
    assert_same_update(d_mask, d_ref, atol=1e-7)
    n_old = sum(len(s.versions) for s in mixed[1::2])
    assert s_mask["masked_token_frac"] == pytest.approx(n_old / sum(len(s.versions) for s in mixed))
    # Lag 3 is within a bound of 3: nothing is masked, the update is the unmasked one.
    kw["buffer__max_staleness"] = 3
    s3, d3 = step_delta(make_learner(engine_cfg, buffer__stale_policy="mask", **kw), mixed, policy_version=3)
    _, d_plain = step_delta(make_learner(engine_cfg, **kw), mixed, policy_version=3)
    assert s3["masked_token_frac"] == 0.0
    assert_same_update(d3, d_plain, atol=1e-7)


def test_step_stats(engine_cfg):
    samples = learner_samples(4, versions=0)
    samples[0].versions = [0] * (len(samples[0].versions) - 1) + [1]  # one token from version 1 (lag 0 at v=1)
    stats = make_learner(engine_cfg).step(samples, policy_version=1)
    n_tok = sum(len(s.response_ids) for s in samples)
    for key in ("offpolicy_token_frac", "version_lag/0", "padding_fraction", "masked_token_frac", "loss",
                "grad_norm", "is_weight_mean", "rollout_logprob_abs_diff"):
        assert key in stats
    assert stats["version_lag/0"] == pytest.approx(1 / n_tok)
    assert stats["version_lag/1"] == pytest.approx((n_tok - 1) / n_tok)
    assert stats["offpolicy_token_frac"] == pytest.approx((n_tok - 1) / n_tok)
    assert stats["masked_token_frac"] == 0.0  # offpolicy none: nothing masked
    # Padded, one micro-batch: 1 - real / (B * longest).
    lens = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    assert stats["padding_fraction"] == pytest.approx(1 - sum(lens) / (len(lens) * max(lens)))
    assert stats["samples_trained"] == len(samples)
    assert stats["rollout_logprob_tokens"] == 1  # the one token of the learner's own version


def test_step_logprob_gap_is_missing_when_nothing_was_measured(engine_cfg):
    """No token of the learner's own version: the engine/learner gap is NaN
    with 0 tokens behind it, not a perfect 0."""
    stats = make_learner(engine_cfg).step(learner_samples(4), policy_version=3)
    assert stats["rollout_logprob_tokens"] == 0 and math.isnan(stats["rollout_logprob_abs_diff"])
    stats = make_learner(engine_cfg).step(learner_samples(4), policy_version=0)
    n = sum(len(s.response_ids) for s in learner_samples(4))
    assert stats["rollout_logprob_tokens"] == n and stats["rollout_logprob_abs_diff"] > 0


def test_step_reports_the_effective_sample_size_of_the_ht_weights(engine_cfg):
    samples = learner_samples(4)
    for s, p in zip(samples, [0.5, 0.25, 1.0, 1.0, 0.8, 0.5, 1.0, 0.2]):
        s.inclusion = p
    w = [1 / s.inclusion for s in samples]
    stats = make_learner(engine_cfg, learner__pruning_correction="ht").step(samples)
    assert stats["ht_ess"] == pytest.approx(sum(w) ** 2 / sum(x * x for x in w))
    assert stats["ht_ess_frac"] == pytest.approx(stats["ht_ess"] / len(samples)) and stats["ht_ess_frac"] < 0.8
    assert stats["ht_weight_max"] == 5.0


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_step_members_count_groups_the_samples_lack(engine_cfg, loss):
    """Under ht the normaliser is the batch's members before pruning, those of
    a group none of whose samples is left (all truncated and masked) too:
    with twice the members the update's gradient is half."""
    samples = learner_samples(5)
    base = dict(sgd=True, sgd_lr=1.0, learner__pruning_correction="ht", learner__loss=loss, learner__grad_clip=1e9,
                learner__dapo_norm="budget")
    _, d1 = step_delta(make_learner(engine_cfg, **base), samples)
    _, d2 = step_delta(make_learner(engine_cfg, **base), samples, members=16)  # 8 in the samples' 2 groups
    for k in d1:
        assert torch.allclose(d2[k], d1[k] / 2, atol=1e-7 + 2 * d1.ulp[k], rtol=1e-3), k


@pytest.mark.parametrize("loss", KINDS)
def test_step_zero_advantage_samples_only_count_in_the_normalisers(engine_cfg, loss):
    """A group whose rewards are all equal (advantage 0) adds nothing to the
    gradient but counts in the normalisers (sequences for grpo and gspo,
    tokens for dapo), so the update with it is the update without it scaled
    by N_without / N_with (SGD, no clipping). The learner skips its forward
    and backward passes; the update must not change."""
    live = learner_samples(5)
    rng = random.Random(5)
    flat = [Sample([rng.randint(1, 258) for _ in range(5)], [rng.randint(1, 258) for _ in range(7)], 0.0,
                   [-5.0] * 7, [0] * 7, group_id="flat", sample_id=f"flat-{j}", group_size=4) for j in range(4)]
    kw = dict(sgd=True, learner__loss=loss, learner__grad_clip=1e6)
    s_live, d_live = step_delta(make_learner(engine_cfg, **kw), live)
    s_all, d_all = step_delta(make_learner(engine_cfg, **kw), live[:4] + flat + live[4:])
    assert s_live["samples_without_gradient"] == 0 and s_all["samples_without_gradient"] == 4
    if loss == "dapo":
        scale = sum(len(s.response_ids) for s in live) / sum(len(s.response_ids) for s in live + flat)
    else:
        scale = len(live) / (len(live) + len(flat))
    assert any(float(d.abs().max()) > 0 for d in d_live.values())
    assert_same_update(d_all, {k: v * scale for k, v in d_live.items()}, atol=1e-7)


def test_step_with_no_gradient_is_still_an_optimizer_step(engine_cfg):
    """A batch of zero-advantage samples trains nothing, but AdamW still
    steps with a zero gradient (its momentum moves the weights), as the full
    pass over those samples would."""
    live = learner_samples(6)
    flat = [dataclasses.replace(s, advantage=0.0) for s in learner_samples(7)]
    a, b = make_learner(engine_cfg), make_learner(engine_cfg)
    a.step(live)
    b.step(live)
    stats, delta = step_delta(a, flat)
    assert stats["samples_without_gradient"] == len(flat) and stats["grad_norm"] == 0.0
    before = params(b)
    for p in b.model.parameters():
        p.grad = torch.zeros_like(p)
    b.opt.step()
    ref = {k: v.detach() - before[k] for k, v in b.model.named_parameters()}
    assert any(float(d.abs().max()) > 0 for d in ref.values())
    assert_same_update(delta, ref, atol=0.0)


@pytest.mark.parametrize("mode", ["tis", "decoupled"])
def test_step_is_modes_with_rollout_equal_to_learner_are_plain(engine_cfg, mode):
    """When the rollout log-probs are the learner's own, every IS weight is 1:
    TIS / decoupled give exactly the uncorrected update."""
    learner = make_learner(engine_cfg, sgd=True, learner__offpolicy=mode, learner__grad_clip=1e6)
    samples = learner_samples(5)
    own, _ = learner.logprobs(samples)
    samples = [dataclasses.replace(s, rollout_logprobs=own[id(s)].tolist()) for s in samples]
    s_is, d_is = step_delta(learner, samples, policy_version=0)
    s_pl, d_pl = step_delta(make_learner(engine_cfg, sgd=True, learner__grad_clip=1e6), samples, policy_version=0)
    assert s_is["is_weight_max"] == pytest.approx(1.0, abs=1e-6)
    assert s_is["loss"] == pytest.approx(s_pl["loss"], rel=1e-6, abs=1e-9)
    assert_same_update(d_is, d_pl, atol=1e-6)
    # Missing rollout log-probs: a clear error.
    bare = [dataclasses.replace(s, rollout_logprobs=None) for s in samples]
    with pytest.raises(ValueError, match="rollout log-probs"):
        make_learner(engine_cfg, learner__offpolicy=mode).step(bare)


def test_step_kl_zero_at_the_reference(engine_cfg):
    """First step: π_θ = π_ref, so k3 and its gradient are 0: the update with
    kl_beta > 0 equals the one without."""
    samples = learner_samples(6)
    _, d_kl = step_delta(make_learner(engine_cfg, sgd=True, learner__kl_beta=0.5, learner__grad_clip=1e6), samples)
    _, d_0 = step_delta(make_learner(engine_cfg, sgd=True, learner__grad_clip=1e6), samples)
    assert_same_update(d_kl, d_0, atol=1e-7)


def test_step_log_prob_pass_skips_the_first_minibatch(engine_cfg):
    """With several mini-batches π_old comes from a pass before the first
    update; the first mini-batch's own forward runs before any update, so the
    pass covers only the later ones (samples[i::3], i = 1, 2)."""
    learner = make_learner(engine_cfg, learner__minibatches=3)
    samples = [s for s in learner_samples(4) if s.advantage != 0.0]
    asked = []
    inner = learner.logprobs
    learner.logprobs = lambda xs: (asked.append([s.sample_id for s in xs]), inner(xs))[1]
    stats, delta = step_delta(learner, samples)
    assert len(asked) == 1
    assert sorted(asked[0]) == sorted(s.sample_id for i in (1, 2) for s in samples[i::3])
    assert stats["grad_norm"] > 0 and math.isfinite(stats["loss"])
    assert any(float(d.abs().max()) > 0 for d in delta.values())


def test_step_reports_the_engine_learner_mismatch_of_its_trained_tokens(engine_cfg):
    """`mismatch/*`: log π_rollout − log π_old over the tokens with a
    gradient, its mean exact and its quantiles within a histogram bin."""
    import numpy as np

    learner = make_learner(engine_cfg, learner__minibatches=2)
    samples = learner_samples(5)
    live = [s for s in samples if s.advantage != 0.0]
    old, _ = learner.logprobs(live)
    m = torch.cat([torch.tensor(s.rollout_logprobs) - old[id(s)] for s in live]).double()
    stats = learner.step(samples, policy_version=0)
    assert stats["mismatch/tokens"] == m.numel()
    assert stats["mismatch/mean"] == pytest.approx(float(m.mean()), abs=1e-5)
    for key, q in (("q01", 0.01), ("q05", 0.05)):
        lo, hi = np.quantile(m.numpy(), [max(q - 1 / len(m), 0), q + 1 / len(m)])
        assert lo - 0.02 * abs(lo) - 1e-4 <= stats[f"mismatch/{key}"] <= hi + 0.02 * abs(hi) + 1e-4
    assert stats["mismatch/q05_pos0-63"] == stats["mismatch/q05"]  # every response is shorter than 64
