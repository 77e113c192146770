"""The tiny count-down task and its byte-level tokenizer."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.tiny.task import (
    ANSWER_REGEX,
    LEVELS,
    START_RANGE,
    STEP_LETTERS,
    level_of,
    make_dataset,
    make_problem,
)
from stream_rl.verifier import MathVerifier

PROMPT_RE = re.compile(r"^(\d{2})([a-i])=$")


@pytest.fixture(scope="module")
def verifier() -> MathVerifier:
    return MathVerifier(ANSWER_REGEX)


def parse_prompt(prompt: str) -> tuple[int, int]:
    m = PROMPT_RE.match(prompt)
    assert m, prompt
    return int(m.group(1)), STEP_LETTERS.index(m.group(2)) + 1


def test_hand_example():
    # The module docstring's example: 73 in steps of c = 3.
    for seed in range(10_000):
        p = make_problem(random.Random(seed))
        if p.prompt == "73c=":
            break
    else:  # pragma: no cover
        pytest.fail("no 73c= problem in 10000 seeds")
    assert p.answer == "1"
    assert p.solution.startswith("70 67 64 ")
    assert p.solution.endswith(" 04 01 #### 1")
    assert len(p.solution.split(" ####")[0].split()) == 24
    assert p.level == 3


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2 ** 32))
def test_problem_invariants(seed):
    p = make_problem(random.Random(seed))
    start, step = parse_prompt(p.prompt)
    assert START_RANGE[0] <= start <= START_RANGE[1] and 1 <= step <= 9
    assert p.answer == str(start % step)
    body, answer = p.solution.split(" #### ")
    numbers = [int(x) for x in body.split()]
    assert answer == p.answer
    assert len(numbers) == start // step
    assert all(len(x) == 2 for x in body.split())  # two digits, zero padded
    # Each number is the previous minus the step, from start - step down to the first below the step.
    assert numbers == [start - step * k for k in range(1, len(numbers) + 1)]
    assert numbers[-1] == start % step and numbers[-1] < step
    assert p.level == level_of(len(numbers))


def test_every_solution_verifies(verifier):
    for p in make_dataset(300, seed=1):
        assert verifier.score(p.solution, p.answer) == 1.0, p
        wrong = str((int(p.answer) + 1) % 10)
        assert verifier.score(p.solution, wrong) == 0.0, p


def test_level_of_buckets():
    assert [level_of(n) for n in (1, 3, 4, 7, 8, 15, 16, 31, 32, 99)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # The levels tile every possible response length (1 .. 99 numbers, step 1
    # from 99) with no gap.
    assert LEVELS[0][0] == 1 and LEVELS[-1][1] == START_RANGE[1]
    for (_, hi), (lo, _) in zip(LEVELS, LEVELS[1:]):
        assert lo == hi + 1


def test_make_dataset_deterministic_per_seed():
    assert make_dataset(50, seed=3) == make_dataset(50, seed=3)
    assert make_dataset(50, seed=3) != make_dataset(50, seed=4)
    assert len(make_dataset(17, seed=0)) == 17


def test_level_distribution_has_a_long_tail():
    levels = Counter(p.level for p in make_dataset(5000, seed=0))
    assert set(levels) == {0, 1, 2, 3, 4}
    assert levels[4] > 0
    assert levels[0] + levels[1] + levels[2] > 2500
    # Long responses are the minority: each level above 2 is rarer than level 2.
    assert levels[3] < levels[2] and levels[4] < levels[2]


# --- tokenizer -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from stream_rl.tiny.model import build_tokenizer

    return build_tokenizer()


def test_tokenizer_round_trips_prompts_and_solutions(tok):
    for p in make_dataset(200, seed=5):
        for text in (p.prompt, p.solution, p.prompt + p.solution):
            ids = tok(text, add_special_tokens=True).input_ids
            assert tok.decode(ids) == text
        assert len(tok(p.prompt).input_ids) == len(p.prompt)  # one token per byte, nothing added


def test_tokenizer_has_eos(tok):
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id is not None
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == tok.eos_token
    ids = tok("07g= 00 #### 0").input_ids + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "07g= 00 #### 0"
    assert tok.pad_token_id == tok.eos_token_id


def test_held_out_split_is_disjoint_from_training_draws():
    from stream_rl.tiny.task import held_out_problems, make_dataset

    held = {p.prompt for p in held_out_problems()}
    train = {p.prompt for p in make_dataset(5000, seed=3)}
    assert 50 <= len(held) <= 200  # about 1/8 of the 810 (start, step) pairs
    assert not held & train
    assert {p.prompt for p in make_dataset(200, seed=3, split="eval")} <= held
