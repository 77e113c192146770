"""MathVerifier: regex-cut answers (the tiny task) and math-verify's own extraction."""

from __future__ import annotations

import threading

import pytest

from stream_rl.tiny.task import ANSWER_REGEX
from stream_rl.verifier import MathVerifier
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny() -> MathVerifier:
    return MathVerifier(ANSWER_REGEX)


@pytest.fixture(scope="module")
def free() -> MathVerifier:
    return MathVerifier()


# --- with the tiny task's regex --------------------------------------------------

@pytest.mark.parametrize("response,answer,expected", [
    ("70 67 64 61 #### 1", "1", 1.0),
    ("06 03 00 #### 0", "0", 1.0),
    ("#### -3", "-3", 1.0),
    ("70 67 #### 1  \n", "1", 1.0),  # trailing whitespace is allowed by the regex
    ("70 67 64 61 #### 2", "1", 0.0),  # wrong answer
    ("70 67 64 61", "1", 0.0),  # no #### marker
    ("70 67 64 61 1", "1", 0.0),  # right number, but no marker
    ("#### 1 and more", "1", 0.0),  # the marker must end the response
    ("", "1", 0.0),  # empty response
])
def test_tiny_regex_scores(tiny, response, answer, expected):
    assert tiny.score(response, answer) == expected


def test_tiny_regex_extract(tiny):
    assert tiny.extract("12 09 06 03 00 #### 0") == "0"
    assert tiny.extract("no marker") is None


# --- math-verify's own extraction -----------------------------------------------------

@pytest.mark.parametrize("response,answer,expected", [
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"So the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("The answer is 41.", "42", 0.0),
    (r"\boxed{7}", "8", 0.0),
    ("", "42", 0.0),
    ("   ", "42", 0.0),
])
def test_free_form_scores(free, response, answer, expected):
    assert free.score(response, answer) == expected


# Model output as it comes: prose, LaTeX, boxed answers, several numbers.
@pytest.mark.parametrize("response,answer,expected", [
    ("the result is 42", "42", 1.0),
    ("it is 5 apples", "5", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("We add 17 and 25 to get 42, so the answer is 42.", "42", 1.0),
    ("Step 1: 3 * 4 = 12. Step 2: 12 + 1 = 13. The final answer is 13", "13", 1.0),
    ("Step 1: 3 * 4 = 12. Step 2: 12 + 1 = 13. The final answer is 13", "12", 0.0),
    (r"Therefore, the answer is $\boxed{\dfrac{3}{4}}$.", "0.75", 1.0),
    (r"So $x = \frac{1}{2}$.", r"\frac{1}{2}", 1.0),
    (r"The answer is \(\sqrt{2}\).", r"\sqrt{2}", 1.0),
    ("I am not sure.", "42", 0.0),
    ("The answer is -7.", "-7", 1.0),
    ("The answer is 1,000.", "1000", 1.0),
])
def test_free_form_model_output(free, response, answer, expected):
    assert free.score(response, answer) == expected


def test_training_reward_and_eval_agree_without_a_regex(free):
    """The reward's extraction and eval's (`math_answer`) are the same."""
    from stream_rl.verifier import math_answer

    for text in ["the result is 42", "it is 5 apples", r"so \boxed{7}", "We get 10. Then 20."]:
        got = math_answer(text)
        assert got is not None and free.score(text, got) == 1.0


def test_without_regex_extract_is_identity(free):
    assert free.extract("anything at all") == "anything at all"


# --- construction errors ----------------------------------------------------------------

@pytest.mark.parametrize("regex", ["(", "####\\s*(-?\\d+", "[a-"])
def test_invalid_regex(regex):
    with pytest.raises(ValueError, match="data.answer_regex"):
        MathVerifier(regex)


def test_regex_without_group():
    with pytest.raises(ValueError, match="data.answer_regex") as info:
        MathVerifier(r"####\s*-?\d+")
    assert "group" in str(info.value)


def test_empty_regex_means_no_regex():
    assert MathVerifier("").extract("x = 3") == "x = 3"


# --- threads ----------------------------------------------------------------------

def test_scores_from_a_worker_thread(tiny, free):
    results: list = []
    errors: list = []

    def work():
        try:
            results.append(tiny.score("09 06 03 00 #### 0", "0"))
            results.append(tiny.score("09 06 03 00 #### 1", "0"))
            results.append(free.score(r"\boxed{\frac{1}{2}}", "0.5"))
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=60)
    assert not th.is_alive()
    assert not errors, errors
    assert results == [1.0, 0.0, 1.0]


# --- exact match (the tiny task's whole-solution reward) ---------------------

def test_exact_match_compares_the_whole_text_up_to_whitespace():
    v = MathVerifier(match="exact")
    ref = "70 67 64 #### 1"
    assert v.score("70 67 64 #### 1", ref) == 1.0
    assert v.score("  70  67\n64 #### 1 ", ref) == 1.0
    # A slip that still lands on the right final answer fails the rollout.
    assert v.score("70 66 64 #### 1", ref) == 0.0
    assert v.score("70 67 64 #### 1 extra", ref) == 0.0
    assert v.score("", ref) == 0.0


def test_exact_match_applies_after_the_answer_regex():
    v = MathVerifier(r"<a>(.*)</a>", match="exact")
    assert v.score("work <a>x = 2</a>", "x =  2") == 1.0
    assert v.score("work <a>x = 3</a>", "x = 2") == 0.0


def test_unknown_match_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="answer_match"):
        MathVerifier(match="fuzzy")


def test_tiny_config_rewards_the_whole_solution():
    from stream_rl.config import load_config
    from stream_rl.tiny.task import _problem
    from stream_rl.verifier import make_verifier

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    v = make_verifier(cfg.data)
    p = _problem(73, 3)
    assert v.score(p.solution, p.solution) == 1.0
    nums = p.solution.split()
    nums[3] = "%02d" % ((int(nums[3]) + 10) % 100)  # a tens-digit slip, same last digit
    assert v.score(" ".join(nums), p.solution) == 0.0
