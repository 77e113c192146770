"""Verifiable reward: 1.0 if the response's answer equals the reference.

`match: math` (default) is built on math-verify, so LaTeX, fractions and
equivalent forms compare as a mathematician would. An optional regex first
cuts the answer out of the response (GSM8K's `#### 42`); without it
math-verify extracts the answer from the response itself, as its
documentation does for model output (\\boxed{...}, else the last LaTeX or
plain expression: "The answer is 42." gives 42), the same extraction eval
votes on (`math_answer`).
`match: exact` compares the (extracted) text with the reference up to
whitespace: a reward on the whole worked solution, such as the tiny task's,
where one slip anywhere fails the rollout.
"""

from __future__ import annotations

import functools
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify


class MathVerifier:
    def __init__(self, answer_regex: str | None = None, match: str = "math"):
        if match not in ("math", "exact"):
            raise ValueError(f"data.answer_match must be 'math' or 'exact', not {match!r}")
        self.exact = match == "exact"
        try:
            self._answer_re = re.compile(answer_regex) if answer_regex else None
        except re.error as err:
            raise ValueError(f"data.answer_regex is not a valid regex: {err}") from None
        if self._answer_re is not None and self._answer_re.groups < 1:
            raise ValueError("data.answer_regex must have a capturing group for the answer")

    def extract(self, response: str) -> str | None:
        """The answer text to compare, or None when the response has none."""
        if self._answer_re is None:
            return response
        m = self._answer_re.search(response)
        return m.group(1).strip() if m else None

    def score(self, response: str, answer: str) -> float:
        pred = self.extract(response)
        if pred is None or not pred.strip():
            return 0.0
        if self.exact:
            return 1.0 if pred.split() == answer.split() else 0.0
        # Plain integers compare as integers ("07" == "7", as math-verify
        # says too) without parsing: scoring sits on the rollout hot path.
        if _INT.fullmatch(pred.strip()) and _INT.fullmatch(answer.strip()):
            return 1.0 if int(pred) == int(answer) else 0.0
        # math-verify's timeouts use SIGALRM, which only works in the main
        # thread; elsewhere they are switched off rather than failing.
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold = _parse_gold(answer, timeout)
        # A bare answer cut out by the regex is math; a whole response is
        # prose that math-verify searches for its final answer.
        text = _as_math(pred) if self._answer_re is not None else pred
        got = parse(text, extraction_config=_EXTRACTION, parsing_timeout=timeout)
        if not gold or not got:
            return 0.0
        return 1.0 if verify(gold, got, timeout_seconds=timeout) else 0.0


def math_answer(response: str) -> str | None:
    """math-verify's own extraction of a response's answer (\\boxed{...}, else
    the last expression), as text; None when it finds none."""
    got = parse(response, extraction_config=_EXTRACTION)
    return got[1] if len(got) > 1 else None


def make_verifier(data_cfg) -> MathVerifier:
    """The verifier a `data` config section describes."""
    return MathVerifier(data_cfg.answer_regex, data_cfg.answer_match)


# What math-verify extracts, for the reference and the response alike.
_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]
_INT = re.compile(r"[-+]?\d+")


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout):
    # A group's G responses share one reference answer: parse it once.
    return parse(_as_math(answer), extraction_config=_EXTRACTION, parsing_timeout=timeout)


def _as_math(text: str) -> str:
    # A bare answer ("42", "\\frac{1}{2}") is wrapped in $...$ so the LaTeX
    # extractor sees it; text that already carries delimiters passes unchanged.
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"
