"""learner.warmup_steps: the learner's lr per update equals transformers'
constant_with_warmup schedule, which TRL (the e2e bench's peer) and verl use."""

from __future__ import annotations

import pytest
import torch
from transformers import get_constant_schedule_with_warmup

from stream_rl.config import LearnerConfig
from stream_rl.learner.trainer import learning_rate


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_learning_rate_matches_transformers_constant_with_warmup(warmup):
    lc = LearnerConfig(lr=3e-4, warmup_steps=warmup)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lc.lr)
    sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=warmup)
    for steps_done in range(20):
        assert learning_rate(lc, steps_done) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()
    assert learning_rate(lc, 20) == lc.lr
