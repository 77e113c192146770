"""Data parallelism: two gloo ranks take the same update as one rank.

Each case trains a fresh learner for one `step` on a fixed global batch, once
in this process (world 1) and once in each of two worker processes (world 2,
gloo on CPU, joined through `distributed.init_from_env` and fed through
`distributed.broadcast_batch` from rank 0 like the real loop). Rank 0's
parameters must match the single rank's to 1e-5, and the two ranks' must be
identical. A case whose workers skip the gradient all-reduce shows the
comparison can fail.

The two ranks are forked by default (DIST_TEST_START=spawn to spawn them):
on a small CPU box a spawned rank spends ~15 s importing torch and
transformers again, a forked one none (it sets one thread before any torch
op, so the parent's OpenMP pool is never touched).
"""

from __future__ import annotations

import copy
import os
import random
import time

import msgspec
import pytest
import torch

from tests.conftest import cfg_with, free_port
from stream_rl.learner.advantages import group_advantages
from stream_rl.learner.samples import Sample

VOCAB = 259
POLICY_VERSION = 2
TOL = 1e-5


def make_batch(seed: int = 0, groups: int = 3, size: int = 4) -> list[Sample]:
    """`groups` groups of `size` samples: short random prompts and responses,
    group advantages, some pruned-survivor inclusion < 1, token versions
    0..POLICY_VERSION and rollout log-probs."""
    rng = random.Random(seed)
    out = []
    for g in range(groups):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 6))]
        rewards = [float(rng.random() < 0.5) for _ in range(size - 1)]
        rewards.append(1.0 - rewards[0])  # never all equal
        for i, a in enumerate(group_advantages(rewards)):
            n = rng.randint(2, 20)
            out.append(Sample(prompt_ids=list(prompt), response_ids=[rng.randrange(1, VOCAB) for _ in range(n)],
                              advantage=a, rollout_logprobs=[-rng.uniform(0.5, 6.0) for _ in range(n)],
                              versions=[rng.randint(0, POLICY_VERSION) for _ in range(n)],
                              inclusion=rng.choice([1.0, 1.0, 0.8, 0.5]), group_id=f"g{g}",
                              sample_id=f"g{g}-{i}", group_size=size + 1))
    return out


def params(learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run_case(raw_cfg: dict, batch: list[Sample], rank: int = 0, world: int = 1, skip_reduce: bool = False):
    from stream_rl.config import config_from_dict
    from stream_rl.learner.trainer import Learner

    learner = Learner(config_from_dict(raw_cfg), rank, world)
    if skip_reduce:  # the bug the test must catch: a rank that never sums gradients
        learner._reduce_grads = lambda: None
    stats = learner.step(copy.deepcopy(batch), policy_version=POLICY_VERSION)
    return params(learner), stats


def _worker(rank: int, world: int, port: int, cases: list, batch: list[Sample], out_dir: str) -> None:
    from stream_rl.learner import distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    r, w = distributed.init_from_env("cpu")
    assert (r, w) == (rank, world)
    try:
        for name, raw_cfg, skip_reduce in cases:
            # Only rank 0 holds the batch; the others get it by broadcast.
            got = distributed.broadcast_batch([batch, POLICY_VERSION] if rank == 0 else None)
            samples, version = got
            assert version == POLICY_VERSION and samples == batch
            p, stats = run_case(raw_cfg, samples, rank, world, skip_reduce)
            torch.save({"params": p, "stats": stats}, os.path.join(out_dir, f"{name}.{rank}.pt"))
        assert distributed.broadcast_batch(None) is None  # stop
    finally:
        distributed.close()


CASES = {
    "grpo_mb1": dict(learner__loss="grpo", learner__minibatches=1),
    "grpo_mb2": dict(learner__loss="grpo", learner__minibatches=2),
    "dapo_mb1": dict(learner__loss="dapo", learner__minibatches=1),
    "dapo_mb2": dict(learner__loss="dapo", learner__minibatches=2),
    "grpo_ht_tis_mb2": dict(learner__loss="grpo", learner__minibatches=2, learner__pruning_correction="ht",
                            learner__offpolicy="tis"),
    "dapo_ht_tis_mb1": dict(learner__loss="dapo", learner__minibatches=1, learner__pruning_correction="ht",
                            learner__offpolicy="tis"),
    # DPPO's completion pruning draws from the learner's rng: the same on both ranks.
    "dapo_dppo_ht_mb2": dict(learner__loss="dapo", learner__minibatches=2, learner__pruning_correction="ht",
                             learner__dppo_completion_rate=0.5),
}
BROKEN = "grpo_mb1_no_allreduce"


def spawn_cases(base, names: list[str], out) -> dict:
    """Run `names` (CASES keys, or BROKEN) in two worker ranks and here;
    {case: (world-1 params, world-1 stats, [rank 0, rank 1] results)}."""
    import torch.multiprocessing as mp

    # BROKEN runs grpo_mb1's config.
    raws = {name: msgspec.to_builtins(cfg_with(base, **CASES.get(name, CASES["grpo_mb1"]))) for name in names}
    batch = make_batch()
    t0 = time.perf_counter()
    mp.start_processes(_worker, args=(2, free_port(), [(n, raws[n], n == BROKEN) for n in names], batch, str(out)),
                       nprocs=2, join=True, start_method=os.environ.get("DIST_TEST_START", "fork"))
    t1 = time.perf_counter()
    res = {}
    for name in names:
        single = run_case(raws[name], batch)
        res[name] = (*single, [torch.load(out / f"{name}.{r}.pt") for r in range(2)])
    print(f"\n{names}: two ranks {t1 - t0:.1f}s, one rank {time.perf_counter() - t1:.1f}s")
    return res


@pytest.fixture(scope="module")
def base_cfg(engine_cfg):
    # Adam's first step is lr * g / (|g| + eps): for an element whose gradient
    # is a few eps, float noise of a different (equally right) summation
    # order moves it by a visible part of lr. A larger eps keeps the
    # comparison about the gradients the ranks sum (with eps 1e-8, varlen
    # attention's batching put one element 1.03e-5 off).
    return cfg_with(engine_cfg, pruner__mode="none", learner__kl_beta=0.0, learner__adam_eps=1e-6)


@pytest.fixture(scope="module")
def initial(base_cfg):
    from stream_rl.learner.trainer import Learner

    return params(Learner(base_cfg))


# One spawn per minibatch setting, so a failure in one does not hide the other.
@pytest.fixture(scope="module")
def results_mb1(base_cfg, tmp_path_factory):
    names = [n for n in CASES if n.endswith("mb1")] + [BROKEN]
    return spawn_cases(base_cfg, names, tmp_path_factory.mktemp("dist_mb1"))


@pytest.fixture(scope="module")
def results_mb2(base_cfg, tmp_path_factory):
    names = [n for n in CASES if not n.endswith("mb1")]
    return spawn_cases(base_cfg, names, tmp_path_factory.mktemp("dist_mb2"))


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_rank(request, initial, name):
    fixture = "results_mb1" if name.endswith("mb1") else "results_mb2"
    single, stats, (r0, r1) = request.getfixturevalue(fixture)[name]
    assert max_diff(single, initial) > 10 * TOL, "the step must move the weights for the comparison to mean anything"
    diff = max_diff(r0["params"], single)
    assert diff <= TOL, f"rank 0 is {diff:.2e} away from the single rank"
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in single), "ranks diverged"
    # Reduced stats are the whole batch's, on every rank.
    for r in (r0, r1):
        for k in ("loss", "clip_frac", "grad_norm", "samples_trained", "ht_weight_max", "ht_weight_mean"):
            assert r["stats"][k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), k


def test_comparison_catches_a_missing_allreduce(results_mb1):
    single, _, (r0, r1) = results_mb1[BROKEN]
    assert max_diff(r0["params"], single) > 10 * TOL
    assert max_diff(r0["params"], r1["params"]) > 10 * TOL


def test_not_distributed_without_torchrun(monkeypatch):
    from stream_rl.learner import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env("cpu") == (0, 1)
    batch = make_batch(groups=1)
    assert distributed.broadcast_batch(batch) is batch and distributed.broadcast_batch(None) is None
    distributed.close()  # nothing to close: no error
