"""What a vote is over: a candidate's final answer, and when two are the same.

The training reward can be stricter than a final answer (the tiny task's
reward is the whole worked solution, matched exactly). Voting needs the final
answer, so eval has its own answer key (`eval.answer_regex`,
`eval.answer_match`, judged against `eval.answer_field`):

- with a regex, the answer is its first group (None when it does not match);
- without one, `match: math` takes math-verify's extraction (\\boxed{...}, else
  the last expression) and `match: exact` the whole response.

Answers that the verifier calls equal (math-verify equivalence, or equality
up to whitespace) are one vote: they are merged into classes named by their
smallest member, visiting the distinct answers in sorted order, so the
classes depend on the set of answers, never on candidate order.
"""

from __future__ import annotations

from collections.abc import Sequence

from stream_rl.verifier import MathVerifier, math_answer


class AnswerKey:
    def __init__(self, answer_regex: str | None, match: str = "math"):
        # Cuts the answer out as the training reward does (and checks the
        # regex as data.answer_regex is checked).
        self._cut = MathVerifier(answer_regex, match)
        self._math_extract = answer_regex is None and match == "math"
        # Compares two bare answers (or an answer and the reference).
        self._compare = MathVerifier(None, match)

    def extract(self, response: str) -> str | None:
        """The final answer of a response, whitespace-normalised, or None."""
        text = math_answer(response) if self._math_extract else self._cut.extract(response)
        text = " ".join(text.split()) if text is not None else None
        return text or None

    def same(self, a: str, b: str) -> bool:
        return a == b or self._compare.score(a, b) == 1.0

    def correct(self, answer: str | None, reference: str) -> bool:
        return answer is not None and self._compare.score(answer, reference) == 1.0

    def classes(self, answers: Sequence[str | None]) -> list[str | None]:
        """Each answer replaced by its class's name (None stays None)."""
        reps: list[str] = []
        name: dict[str, str] = {}
        for a in sorted({a for a in answers if a is not None}):
            rep = next((r for r in reps if self.same(r, a)), None)
            if rep is None:
                reps.append(a)
                rep = a
            name[a] = rep
        return [name[a] if a is not None else None for a in answers]
