"""What the learner process reports back with each update."""

from __future__ import annotations

from stream_rl.learner.samples import Sample
from stream_rl.learner.source import group_abs_advantage
from stream_rl.protocol import Group


def test_each_group_gets_its_mean_abs_advantage_and_a_group_left_out_zero():
    def sample(gid, adv):
        return Sample(prompt_ids=[1], response_ids=[2], advantage=adv, rollout_logprobs=None, versions=[0],
                      group_id=gid)

    groups = [Group(group_id=g, rollouts=[]) for g in ("a", "b", "c")]
    samples = [sample("a", 1.0), sample("a", -0.5), sample("c", -2.0)]
    assert group_abs_advantage(groups, samples) == {"a": 0.75, "b": 0.0, "c": 2.0}
