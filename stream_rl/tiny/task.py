"""The tiny world's verifiable task: count down from a number in fixed steps.

Prompt:   "73c="            (start 73, step c = 3; letters a..i are steps 1..9)
Response: "70 67 64 ... 04 01 #### 1"

Each response number is the previous one minus the step (two digits with a
borrow), a local rule a few-layer model learns in minutes on a CPU; the
response stops at the first number below the step and states it as the
answer. The reward checks the whole worked solution (`solution`, matched
exactly): a model can land on the right final answer after a slip (it
tracks the last digit's cycle), so a final-answer reward would be decided by
the last few tokens, while with the whole solution one slip anywhere fails
the rollout and the quality of a partial rollout is visible in its prefix
(what ARRoL's quality head needs). The response length is start // step
numbers: small steps make long responses, which gives the long-tailed length
distribution APRIL is about. Difficulty levels bucket that length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STEP_LETTERS = "abcdefghi"  # step 1..9
START_RANGE = (10, 99)
# Levels by number of response numbers (start // step).
LEVELS: tuple[tuple[int, int], ...] = ((1, 3), (4, 7), (8, 15), (16, 31), (32, 99))
ANSWER_MARK = "####"
# Extracts the answer the verifier compares (first group); the tiny config's
# `data.answer_regex`.
ANSWER_REGEX = r"####\s*(-?\d+)\s*$"


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    solution: str  # the reference response, used only by the warm start
    level: int
    start: int
    step: int


def level_of(num_steps: int) -> int:
    return next(i for i, (lo, hi) in enumerate(LEVELS) if lo <= num_steps <= hi)


def is_held_out(start: int, step: int) -> bool:
    """About 1 in 8 (start, step) pairs are kept out of training, so held-out
    prompts are never seen in training (the space has only 810 pairs)."""
    return random.Random(start * 10 + step).random() < 0.125


def countdown(start: int, step: int) -> str:
    """The worked solution of counting down from `start` by `step`."""
    values = range(start - step, -1, -step)
    return " ".join(f"{v:02d}" for v in values) + f" {ANSWER_MARK} {start % step}"


def teacher_slip(start: int, step: int) -> str:
    """The warm start's systematic mistake: the count-down starts with the
    start number itself. Wrong from the first number on, so a partial
    response already shows it, while the rest follows the right rule (the
    model learns one rule, and one early choice RL can correct)."""
    return f"{start:02d} " + countdown(start, step)


def _problem(start: int, step: int) -> Problem:
    # The solution has start // step numbers (start - step down to start % step).
    return Problem(prompt=f"{start:02d}{STEP_LETTERS[step - 1]}=", answer=str(start % step),
                   solution=countdown(start, step), level=level_of(start // step), start=start, step=step)


def make_problem(rng: random.Random, split: str = "train") -> Problem:
    """A random training problem, or with split="eval" a held-out one."""
    while True:
        start, step = rng.randint(*START_RANGE), rng.randint(1, 9)
        if is_held_out(start, step) == (split == "eval"):
            return _problem(start, step)


def make_dataset(n: int, seed: int, split: str = "train") -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, split) for _ in range(n)]


def held_out_problems() -> list[Problem]:
    """Every held-out problem once."""
    return [_problem(start, step) for start in range(START_RANGE[0], START_RANGE[1] + 1)
            for step in range(1, 10) if is_held_out(start, step)]
