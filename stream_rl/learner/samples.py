"""From complete groups to training samples: validation and group advantages.

Under pruning_correction=ht a group's baseline is the Horvitz–Thompson
estimate over its survivors (`ht_group_advantages`): the pruner stopped some
members before their reward, so the survivors' own mean would depend on
which siblings survived (docs/pruning-correction.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stream_rl.learner.advantages import group_advantages, ht_group_advantages
from stream_rl.protocol import Group


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    rollout_logprobs: list[float] | None
    versions: list[int]
    # Probability that this sample survived pruning (ARRoL's p_i for the
    # completion, times DPPO's for completion and prompt); 1 when unpruned.
    inclusion: float = 1.0
    group_id: str = ""
    sample_id: str = ""
    # Members of its group before pruning (the N of DPPO's N'/N).
    group_size: int = 1
    reward: float = 0.0


@dataclass
class SampleSet:
    samples: list[Sample]
    dropped_groups: int = 0  # zero-variance groups left out (DAPO's dynamic sampling)
    rejected: list[str] = field(default_factory=list)  # why each bad rollout was left out
    # Members before pruning of the groups the update covers, those whose
    # samples are all left out included: the normaliser under
    # pruning_correction=ht, fixed before any pruning draw.
    members: int = 0


def _problem(r) -> str | None:
    if not r.response_ids:
        return "has an empty response"
    if r.reward is None or not math.isfinite(r.reward):
        return f"has reward {r.reward}"
    if r.logprobs is not None and len(r.logprobs) != len(r.response_ids):
        return f"has {len(r.logprobs)} logprobs for {len(r.response_ids)} tokens"
    if len(r.versions) != len(r.response_ids):
        return f"has {len(r.versions)} versions for {len(r.response_ids)} tokens"
    if not (0.0 < r.keep_prob <= 1.0 and 0.0 < r.prompt_inclusion <= 1.0):
        return f"has inclusion probabilities {r.keep_prob}, {r.prompt_inclusion} (prompt) outside (0, 1]"
    return None


def samples_from_groups(groups: list[Group], eps: float, drop_zero_variance: bool,
                        mask_truncated: bool = False, *, correction: str = "ht", scale: bool = False) -> SampleSet:
    """Group advantages over each group's valid survivors.

    `correction` "ht": the Horvitz–Thompson baseline over the survivors
    with their keep probabilities (with nothing pruned: the group mean);
    "none": the survivors' own mean. `scale`: divide by the group's reward
    std (GRPO; under "ht" with pruning a consistent, biased estimator).

    A bad survivor (empty response, non-finite reward, log-probs or versions
    not matching its tokens) is left out with a message naming it; the rest
    of its group and of the batch train as usual. A truncated survivor under
    `mask_truncated` keeps its reward in the baseline and leaves the loss.
    """
    if correction not in ("ht", "none"):
        raise ValueError(f"unknown learner.pruning_correction {correction!r}; allowed: 'none', 'ht'")
    out = SampleSet([])
    for g in groups:
        valid = []
        for r in g.survivors:
            problem = _problem(r)
            if problem:
                out.rejected.append(f"rollout {r.rollout_id} of group {g.group_id} {problem}")
            else:
                valid.append(r)
        rewards = [r.reward for r in valid]
        if drop_zero_variance and valid and len(set(rewards)) == 1:
            out.dropped_groups += 1
            continue
        size = len(g.rollouts)
        out.members += size
        if correction == "ht":
            # A rejected survivor has no usable reward: the baseline is over
            # a group without it (as if it had never been sampled).
            advs = ht_group_advantages(rewards, [r.keep_prob for r in valid],
                                       size - (len(g.survivors) - len(valid)), eps, scale)
        else:
            advs = group_advantages(rewards, eps, scale)
        for r, a in zip(valid, advs):
            if mask_truncated and r.finish_reason == "length":
                continue
            out.samples.append(Sample(r.prompt_ids, r.response_ids, a, r.logprobs, r.versions,
                                      inclusion=r.keep_prob * r.prompt_inclusion, group_id=g.group_id,
                                      sample_id=r.rollout_id, group_size=size, reward=r.reward))
    return out
