"""Checkpoints resume exactly: a learner (policy, AdamW, its RNGs, ARRoL's
quality head with its Adam state, replay ring and generator) and a pruner
(calibrator windows, recent scores, survival offset, RNG, step counters)
saved and loaded into fresh objects go on exactly as the originals do.
Writes are atomic; a checkpoint from another model is refused by name."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from tests.conftest import cfg_with
from tests.unit.learner.test_checkpoint import pruner_step, same_metrics
from stream_rl.learner.advantages import group_advantages
from stream_rl.learner.checkpoint import config_hash, load_checkpoint, save_checkpoint
from stream_rl.learner.samples import Sample
from stream_rl.protocol import Group, Rollout
from stream_rl.pruner import make_pruner
from stream_rl.pruner.head import encode_features, head_input_size

VOCAB = 259


# --- builders --------------------------------------------------------------------------------

def make_batch(seed: int) -> list[Sample]:
    """3 groups of 4: random short prompts/responses, group advantages,
    inclusion < 1 on some, token versions."""
    rng = random.Random(seed)
    out = []
    for g in range(3):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 6))]
        rewards = [0.0, 1.0] + [float(rng.random() < 0.5) for _ in range(2)]
        for i, a in enumerate(group_advantages(rewards)):
            n = rng.randint(2, 20)
            out.append(Sample(prompt_ids=list(prompt), response_ids=[rng.randrange(1, VOCAB) for _ in range(n)],
                              advantage=a, rollout_logprobs=[-rng.uniform(0.5, 5.0) for _ in range(n)],
                              versions=[rng.randint(0, 1) for _ in range(n)], inclusion=rng.choice([1.0, 0.6]),
                              group_id=f"g{g}", sample_id=f"g{g}-{i}", group_size=5))
    return out


def head_groups(seed: int, hidden: int, groups: int = 4, size: int = 8) -> list[Group]:
    """Complete groups whose survivors carry head features and a reward."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in range(groups):
        feats = encode_features(torch.randn(size, head_input_size(hidden), generator=gen))
        members = []
        for i, f in enumerate(feats):
            r = Rollout(rollout_id=f"h{seed}-{g}-{i}", group_id=f"h{seed}-{g}", prompt_ids=[1], answer="1",
                        max_tokens=64, response_ids=[1, 2], versions=[0, 0])
            r.features, r.reward, r.finish_reason = f, float((i + g + seed) % 3 == 0), "stop"
            members.append(r)
        out.append(Group(group_id=f"h{seed}-{g}", rollouts=members))
    return out


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_opt(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


def assert_same_learner(a, b) -> None:
    assert_same_tensors(params(a.model), params(b.model))
    assert_same_opt(a.opt, b.opt)
    assert a.steps == b.steps and a.rng.getstate() == b.rng.getstate()
    ha, hb = a.head_trainer, b.head_trainer
    assert_same_tensors(ha.head.state_dict(), hb.head.state_dict())
    assert_same_opt(ha.opt, hb.opt)
    assert torch.equal(ha._x, hb._x) and torch.equal(ha._y, hb._y) and ha._added == hb._added
    assert torch.equal(ha._gen.get_state(), hb._gen.get_state())


# --- the learner ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arrol_cfg(engine_cfg):
    # DPPO's completion pruning draws from learner.rng; HT weights; two
    # optimizer steps a batch; head replay small enough to wrap.
    return cfg_with(engine_cfg, pruner__mode="arrol", pruner__cold_start_steps=1, pruner__head_replay=48,
                    pruner__head_updates=4, pruner__head_batch=16, learner__dppo_completion_rate=0.3,
                    learner__pruning_correction="ht", learner__minibatches=2, learner__kl_beta=0.0)


def test_learner_and_pruner_resume_exactly(arrol_cfg, tmp_path):
    from stream_rl.learner.trainer import Learner

    cfg = arrol_cfg
    a = Learner(cfg)
    hidden = a.model.config.hidden_size
    pa = make_pruner(cfg)
    prng = random.Random(3)
    for k in range(2):
        a.step(make_batch(k), policy_version=k)
        a.train_head(head_groups(k, hidden))
        pruner_step(pa, prng, f"s{k}", cfg.pruner.l_detect)
    assert a.head_trainer._added > len(a.head_trainer._y)  # the ring has wrapped
    torch_rng = torch.get_rng_state()
    save_checkpoint(tmp_path / "ckpt", a, step=2, version=2, pruner=pa, extra={"consumed": 24})
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["version"] == 2 and meta["config_hash"] == config_hash(cfg)
    assert not (tmp_path / "ckpt.tmp").exists()

    b, pb = Learner(cfg), make_pruner(cfg)
    assert any(not torch.equal(x, y) for x, y in zip(params(a.model).values(), params(b.model).values()))
    torch.rand(7)  # move torch's RNG: the load must put it back
    got = load_checkpoint(tmp_path / "ckpt", b, pruner=pb)
    assert got == {"step": 2, "version": 2, "extra": {"consumed": 24}, "config_changed": False}
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert_same_learner(a, b)
    # The tied lm_head follows the loaded embedding.
    assert b.model.lm_head.weight.data_ptr() == b.model.model.embed_tokens.weight.data_ptr()

    # One more of everything on both: identical.
    batch = make_batch(2)
    sa = a.step(copy.deepcopy(batch), policy_version=2)
    sb = b.step(copy.deepcopy(batch), policy_version=2)
    assert same_metrics(sa, sb)
    ha, hb = a.train_head(head_groups(2, hidden)), b.train_head(head_groups(2, hidden))
    assert same_metrics(ha, hb)
    assert_same_learner(a, b)
    da, ma = pruner_step(pa, random.Random(11), "s2", cfg.pruner.l_detect)
    db, mb = pruner_step(pb, random.Random(11), "s2", cfg.pruner.l_detect)
    assert da == db and same_metrics(ma, mb)
    assert any(d == "pruned" for d, _, _ in da) and any(d == "kept" for d, _, _ in da)


def test_weights_alone_do_not_resume(arrol_cfg, tmp_path):
    """The check has teeth: a learner given only the policy weights (fresh
    AdamW moments) ends the next step elsewhere."""
    from stream_rl.learner.trainer import Learner

    a, c = Learner(arrol_cfg), Learner(arrol_cfg)
    for k in range(2):
        a.step(make_batch(k), policy_version=k)
    c.model.load_state_dict(a.model.state_dict())
    c.rng.setstate(a.rng.getstate())
    c.steps = a.steps
    batch = make_batch(2)
    a.step(copy.deepcopy(batch), policy_version=2)
    c.step(copy.deepcopy(batch), policy_version=2)
    pa, pc = params(a.model), params(c.model)
    assert max(float((pa[k] - pc[k]).abs().max()) for k in pa) > 1e-5


def test_save_is_atomic(engine_cfg, tmp_path, monkeypatch):
    """A save that dies midway leaves the previous checkpoint whole; the
    next save replaces it and leaves no temporary behind."""
    from stream_rl.learner import checkpoint
    from stream_rl.learner.trainer import Learner

    learner = Learner(cfg_with(engine_cfg, pruner__mode="none"))
    path = tmp_path / "ckpt"
    save_checkpoint(path, learner, step=1, version=1)
    before = params(learner.model)
    learner.step(make_batch(0), policy_version=1)

    real_save = torch.save

    def dying_save(obj, f, *args, **kw):
        if str(f).endswith("trainer.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, learner, step=2, version=2)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    fresh = Learner(cfg_with(engine_cfg, pruner__mode="none"))
    assert load_checkpoint(path, fresh)["step"] == 1
    assert_same_tensors(params(fresh.model), before)

    save_checkpoint(path, learner, step=2, version=2)
    assert load_checkpoint(path, fresh)["step"] == 2
    assert_same_tensors(params(fresh.model), params(learner.model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # A different config is loaded but flagged.
    other = Learner(cfg_with(engine_cfg, pruner__mode="none", learner__lr=1e-5))
    assert load_checkpoint(path, other)["config_changed"] is True


def test_other_model_is_refused(engine_cfg, tmp_path):
    """Shapes that do not match raise a ValueError naming the tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from stream_rl.learner.trainer import Learner

    cfg = cfg_with(engine_cfg, pruner__mode="none")
    save_checkpoint(tmp_path / "ckpt", Learner(cfg), step=0, version=0)
    for change in ({"intermediate_size": 128}, {"num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}):
        conf = AutoConfig.from_pretrained(cfg.model.path)
        for k, v in change.items():
            setattr(conf, k, v)
        d = tmp_path / f"model-{len(change)}"
        AutoModelForCausalLM.from_config(conf).save_pretrained(d)
        other = Learner(cfg_with(cfg, model__path=str(d)))
        kept = params(other.model)
        with pytest.raises(ValueError, match="does not fit this model") as e:
            load_checkpoint(tmp_path / "ckpt", other)
        assert "mlp" in str(e.value) or "layers.3" in str(e.value)
        assert_same_tensors(params(other.model), kept)  # nothing was changed
    # A head where none is expected (and the reverse) is refused too.
    with pytest.raises(ValueError, match="quality head"):
        load_checkpoint(tmp_path / "ckpt", Learner(cfg_with(engine_cfg, pruner__mode="arrol")))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing", Learner(cfg))


# --- the pruner alone --------------------------------------------------------------------------


# --- the job checkpoint: assembled beside the last one, swapped in whole -----------

