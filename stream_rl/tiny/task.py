"""The tiny world's verifiable task: count down from a number in fixed steps.

Prompt:   "73c="            (start 73, step c = 3; letters a..i are steps 1..9)
Response: "70 67 64 ... 04 01 #### 1"

Each response number is the previous one minus the step (two digits with a
borrow), a local rule a few-layer model learns in minutes on a CPU; the
response stops at the first number below the step and states it as the
answer. The reward checks the whole worked solution (`solution`, matched
exactly), so one slip anywhere fails the rollout; the vote's key is the
final answer after `####`.

World v10 puts the miniature in the regime the RLVR papers describe
(../shared/papers/): the warm start learns from a teacher that, at the very
first number, sometimes takes a wrong approach (`teacher_solution`):
- a wrong step (step + 1): a short, confident, wrong answer, the same one
  for every sample of the prompt (voting can be fooled by it);
- a wrong start and sign (the start number itself, then counting up): the
  count never reaches its stopping point, so the response rambles to the
  token budget, as wrong LLM answers do.
Both are visible in a rollout's first tokens, long before it ends ("nearly
perfect or completely wrong early in generation"), which is what ARRoL's
quality head reads at L_detect, and the ramblers are the long tail that
stalls a synchronous batch. Steps 6..9 are the hard ones: the teacher errs
there more often, and more by the wrong step, so the wrong answer often
outvotes the right one (room between majority vote and pass@k); on the easy
ones the right answer wins the vote more often than a sample is right (room
between pass@1 and the vote).
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


# The teacher's approach at the first number, by difficulty: (right, wrong
# step, wrong sign). Hard problems (step >= HARD_STEP) err more and mostly by
# the wrong step.
HARD_STEP = 6
APPROACH_RATES = {"easy": (0.62, 0.18, 0.20), "hard": (0.35, 0.47, 0.18)}


def wrong_step(step: int) -> int:
    return step + 1 if step < 9 else step - 1


def count_up(start: int, step: int, chars: int) -> str:
    """The rambling slip: the start number itself (a wrong first number, as
    the learned copy of the prompt it is), then counting up, which never
    reaches a number below the step; cut at `chars` characters (no answer)."""
    values, v, text = [f"{start:02d}"], start, ""
    while len(text) < chars:
        v += step
        values.append(f"{v:02d}")
        text = " ".join(values)
    return text[:chars]


def teacher_solution(problem: "Problem", rng: random.Random, budget_chars: int) -> tuple[str, bool]:
    """One response of the warm start's teacher and whether it ends (a
    count-up is cut at `budget_chars`, past the RL token budget: it has no EOS)."""
    right, wrong, _ = APPROACH_RATES["hard" if problem.step >= HARD_STEP else "easy"]
    u = rng.random()
    if u < right:
        return problem.solution, True
    if u < right + wrong:
        return countdown(problem.start, wrong_step(problem.step)), True
    return count_up(problem.start, problem.step, budget_chars), False


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
