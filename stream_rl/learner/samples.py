"""From complete groups to training samples: validation and group advantages."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stream_rl.buffer.rollouts import Group
from stream_rl.learner.advantages import group_advantages


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
    # Probability its prompt survived prompt-level pruning (part of inclusion).
    prompt_inclusion: float = 1.0


@dataclass
class SampleSet:
    samples: list[Sample]
    dropped_groups: int = 0  # zero-variance groups left out (DAPO's dynamic sampling)
    rejected: list[str] = field(default_factory=list)  # why each bad rollout was left out


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
                        mask_truncated: bool = False) -> SampleSet:
    """Group advantages over each group's valid survivors.

    A bad survivor (empty response, non-finite reward, log-probs or versions
    not matching its tokens) is left out with a message naming it; the rest
    of its group and of the batch train as usual.
    """
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
        if not valid or (drop_zero_variance and len(set(rewards)) == 1):
            out.dropped_groups += 1 if valid else 0
            continue
        trained = [(r, a) for r, a in zip(valid, group_advantages(rewards, eps))
                   if not (mask_truncated and r.finish_reason == "length")]
        # Members before pruning; truncated survivors left out of the loss
        # are left out of the count too.
        size = len(g.rollouts) - (len(valid) - len(trained))
        for r, a in trained:
            out.samples.append(Sample(r.prompt_ids, r.response_ids, a, r.logprobs, r.versions,
                                      inclusion=r.keep_prob * r.prompt_inclusion, group_id=g.group_id,
                                      sample_id=r.rollout_id, group_size=size,
                                      prompt_inclusion=r.prompt_inclusion))
    return out
