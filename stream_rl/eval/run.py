"""`stream-rl eval`: k samples per question, four ways to pick one answer.

For each question the policy samples k candidates (vLLM, the generator's
sampling settings); each candidate's final answer is cut out by the eval
answer key (`eval.answer_regex`; see `eval.answers`) and judged against the
row's `eval.answer_field`. Reported, as fractions of the questions:

- pass_at_1: mean correctness over all candidates;
- pass_at_k: some candidate is correct;
- maj_at_k: the majority answer is correct;
- qhead_at_k: the quality head's rank-weighted vote (ARRoL §4.4), with the
  head scored in the engine at L_detect tokens (or at the end of a shorter
  candidate);
- deepconf_at_k: DeepConf's confidence-weighted vote.

With a head, two diagnostics say what it could add to the majority:
qhead_ceiling_at_k is the rank vote with a perfect head (every correct
candidate ranked above every wrong one), and head.auc_within_question_maj_
right / _maj_wrong split the head's within-question AUC by whether the
majority was right (a head that only knows what the majority knows has a high
AUC on the first and none on the second).

A candidate with no extractable answer does not vote (and is not correct).
Without a quality head (a plain model directory, or a run without ARRoL)
qhead_at_k is null, with a warning; the rest is reported.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from stream_rl.config import Config, ConfigError
from stream_rl.eval.answers import AnswerKey
from stream_rl.eval.checkpoint import PolicySource, check_fits, resolve_checkpoint
from stream_rl.eval.sampler import Candidate, EvalEngine
from stream_rl.eval.voting import TIE_RULE, majority_vote, rank_vote, trace_confidence, weighted_vote
from stream_rl.preflight import load_model_config, load_tokenizer
from stream_rl.pruner.quality import head_accuracy, head_auc, stratified_auc

log = logging.getLogger(__name__)

METRICS = ("pass_at_1", "pass_at_k", "maj_at_k", "qhead_at_k", "deepconf_at_k")


@dataclass
class QuestionResult:
    prompt: str
    reference: str
    answers: list[str | None]  # per candidate, by class
    correct: list[bool]  # per candidate
    scores: list[float | None]
    scored_at: list[int | None]
    lengths: list[int]
    trace_confidence: list[float]  # DeepConf's weights
    finish_reasons: list[str]
    responses: list[str]
    maj: str | None
    qhead: str | None
    deepconf: str | None
    winners_correct: dict[str, bool]


def judge(key: AnswerKey, reference: str, texts: list[str], cands: list[Candidate], cfg: Config,
          has_head: bool, prompt: str) -> QuestionResult:
    """One question's answer classes, each rule's winner and its verdicts."""
    e = cfg.eval
    answers = key.classes([key.extract(t) for t in texts])
    trace = [trace_confidence(c.confidence, e.deepconf_window, e.deepconf_trace) if c.confidence else 0.0
             for c in cands]
    winners = {"maj": majority_vote(answers),
               "qhead": rank_vote(answers, [c.score for c in cands]) if has_head else None,
               "deepconf": weighted_vote(answers, trace)}
    verdict = {a: key.correct(a, reference) for a in set(answers) if a is not None}
    return QuestionResult(
        prompt=prompt, reference=reference, answers=answers,
        correct=[verdict.get(a, False) if a is not None else False for a in answers],
        scores=[c.score for c in cands], scored_at=[c.scored_at for c in cands],
        lengths=[len(c.token_ids) for c in cands], trace_confidence=trace,
        finish_reasons=[c.finish_reason for c in cands], responses=texts,
        maj=winners["maj"], qhead=winners["qhead"], deepconf=winners["deepconf"],
        winners_correct={m: (verdict.get(w, False) if w is not None else False) for m, w in winners.items()
                         if not (m == "qhead" and not has_head)})


def _nan_to_none(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def head_report(results: list[QuestionResult], l_detect: int) -> dict:
    """How well the head's scores predict correctness on these candidates:
    AUC over all, within a question (the pairs a vote compares), and for
    candidates scored at L_detect vs at their end (shorter, never trained on)."""
    s, y, q, full, maj_ok = [], [], [], [], []
    unscored = 0
    for i, r in enumerate(results):
        for sc, ok, n in zip(r.scores, r.correct, r.lengths):
            if sc is None:
                unscored += 1
                continue
            s.append(sc)
            y.append(ok)
            q.append(i)
            full.append(n >= l_detect)
            maj_ok.append(r.winners_correct["maj"])
    s, y, q, full = np.array(s), np.array(y, dtype=bool), np.array(q), np.array(full, dtype=bool)
    maj_ok = np.array(maj_ok, dtype=bool)
    out = {"scored": int(s.size), "unscored": unscored, "l_detect": l_detect}
    if s.size:
        out.update(auc=head_auc(s, y), auc_within_question=stratified_auc(s, y, q),
                   accuracy=head_accuracy(1 / (1 + np.exp(-s)), y),
                   auc_at_l_detect=head_auc(s[full], y[full]), n_at_l_detect=int(full.sum()),
                   auc_shorter=head_auc(s[~full], y[~full]), n_shorter=int((~full).sum()),
                   auc_within_question_at_l_detect=stratified_auc(s[full], y[full], q[full]),
                   auc_within_question_maj_right=stratified_auc(s[maj_ok], y[maj_ok], q[maj_ok]),
                   auc_within_question_maj_wrong=stratified_auc(s[~maj_ok], y[~maj_ok], q[~maj_ok]))
    return {k: _nan_to_none(v) for k, v in out.items()}


def disagreement(results: list[QuestionResult], a: str, b: str) -> dict:
    """Questions where rules a and b pick different answers, and who was right."""
    diff = [r for r in results if getattr(r, a) != getattr(r, b)]
    return {"questions": len(diff),
            f"{a}_right": sum(r.winners_correct[a] and not r.winners_correct[b] for r in diff),
            f"{b}_right": sum(r.winners_correct[b] and not r.winners_correct[a] for r in diff)}


def _ceiling_correct(r: QuestionResult) -> bool:
    """Whether a perfect head's rank vote (correct candidates share the top
    ranks) picks a correct answer."""
    won = rank_vote(r.answers, [float(c) for c in r.correct])
    return any(c and a == won for a, c in zip(r.answers, r.correct))


def summarize(results: list[QuestionResult], k: int, has_head: bool, l_detect: int) -> dict:
    n = len(results)

    def frac(xs) -> float:
        return float(np.mean(xs)) if len(xs) else math.nan

    out = {
        "pass_at_1": frac([np.mean(r.correct) for r in results]),
        "pass_at_k": frac([any(r.correct) for r in results]),
        "maj_at_k": frac([r.winners_correct["maj"] for r in results]),
        "qhead_at_k": frac([r.winners_correct["qhead"] for r in results]) if has_head else None,
        "deepconf_at_k": frac([r.winners_correct["deepconf"] for r in results]),
        "k": k, "questions": n,
        "answered_fraction": frac([np.mean([a is not None for a in r.answers]) for r in results]),
        "tie_rule": TIE_RULE,
        "disagreement": {"maj_vs_deepconf": disagreement(results, "maj", "deepconf")},
    }
    if has_head:
        out["qhead_ceiling_at_k"] = frac([_ceiling_correct(r) for r in results])
        out["disagreement"]["maj_vs_qhead"] = disagreement(results, "maj", "qhead")
        out["disagreement"]["qhead_vs_deepconf"] = disagreement(results, "qhead", "deepconf")
        out["head"] = head_report(results, l_detect)
    return {k_: _nan_to_none(v) for k_, v in out.items()}


def _head_l_detect(cfg: Config, source: PolicySource) -> int:
    if source.head_l_detect is not None and source.head_l_detect != cfg.pruner.l_detect:
        log.warning("the head was trained at L_detect=%d, the config says pruner.l_detect=%d: scoring at %d",
                    source.head_l_detect, cfg.pruner.l_detect, source.head_l_detect)
    return source.head_l_detect if source.head_l_detect is not None else cfg.pruner.l_detect


async def _evaluate(cfg: Config, source: PolicySource, rows, tokenizer, key: AnswerKey, k: int, l_detect: int,
                    progress: bool) -> tuple[list[QuestionResult], bool]:
    engine = EvalEngine(cfg, source)
    try:
        await engine.start()
        if not engine.has_head:
            log.warning("%s has no quality head: qhead_at_k is skipped (the other metrics are reported)",
                        source.path)
        # Enough questions in flight to keep the engine's batch full while
        # some of them are in their scoring pass.
        slots = asyncio.Semaphore(max(2, math.ceil(2 * cfg.generator.max_num_seqs / k)))

        async def one(i: int, row) -> QuestionResult:
            async with slots:
                cands = await engine.sample(list(row.prompt_ids), k, f"eval-q{i}")
                await engine.score(list(row.prompt_ids), cands, l_detect, f"eval-q{i}")
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in cands]
            return judge(key, row.answer, texts, cands, cfg, engine.has_head, row.prompt)

        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(rows)]
        with _progress(progress, len(tasks)) as advance:
            for t in asyncio.as_completed(tasks):
                await t
                advance()
        return [t.result() for t in tasks], engine.has_head
    finally:
        engine.close()


class _progress:
    """A rich progress bar over questions (nothing when off)."""

    def __init__(self, on: bool, total: int):
        self.on, self.total = on, total

    def __enter__(self):
        if not self.on:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # On stderr: stdout carries the JSON.
        self._bar = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             console=Console(stderr=True))
        self._bar.start()
        task = self._bar.add_task("questions", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self.on:
            self._bar.stop()
        return False


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stream-rl eval: {summary['questions']} questions, k = {summary['k']}")
    table.add_column("metric")
    table.add_column("accuracy", justify="right")
    for m in METRICS:
        v = summary.get(m)
        table.add_row(m, "skipped (no head)" if v is None else f"{v:.3f}")
    head = summary.get("head")
    if head and head.get("auc") is not None:
        table.add_row("head AUC (within question)", f"{head['auc']:.3f} ({_fmt(head.get('auc_within_question'))})")
    Console(stderr=True).print(table)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def evaluate(cfg: Config, checkpoint: str | Path, data: str | Path | None = None, k: int | None = None,
             limit: int | None = None, out_json: str | Path | None = None, progress: bool | None = None,
             details: bool = False) -> dict:
    """Run the evaluation; returns (and writes to `out_json`) the summary."""
    import uvloop

    from stream_rl.eval.heldout import load_heldout

    t0 = time.perf_counter()
    # vLLM logs to stdout by default; the command prints its JSON there.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    k = k or cfg.eval.k
    source = resolve_checkpoint(checkpoint)
    try:
        key = AnswerKey(cfg.eval.answer_regex, cfg.eval.answer_match)
    except ValueError as err:  # the verifier names data.answer_regex
        raise ConfigError(str(err).replace("data.answer_regex", "eval.answer_regex")) from None
    l_detect = _head_l_detect(cfg, source)
    cfg = EvalEngine.engine_config(cfg, source)
    check_fits(source, load_model_config(cfg))  # before the engine loads, not after
    tokenizer = load_tokenizer(cfg)
    # The held-out rows, rendered as in training, with the eval's reference field.
    data_cfg = msgspec.structs.replace(cfg.data, answer_field=cfg.eval.answer_field)
    rows, ds = load_heldout(msgspec.structs.replace(cfg, data=data_cfg), tokenizer, data, limit, section="eval")
    if not rows:
        raise ValueError(f"no questions in {ds.source}")
    show = cfg.run.progress if progress is None else progress
    results, has_head = uvloop.run(_evaluate(cfg, source, rows, tokenizer, key, k, l_detect, show))
    summary = summarize(results, k, has_head, l_detect)
    summary.update(wall_s=time.perf_counter() - t0, checkpoint=str(source.path), data=ds.source,
                   answer_key={"field": cfg.eval.answer_field, "regex": cfg.eval.answer_regex,
                               "match": cfg.eval.answer_match},
                   deepconf={"top_k": cfg.eval.deepconf_top_k, "window": cfg.eval.deepconf_window,
                             "trace": cfg.eval.deepconf_trace},
                   sampling={"temperature": cfg.generator.temperature, "top_p": cfg.generator.top_p,
                             "max_tokens": cfg.generator.max_tokens, "seeded": cfg.generator.seeded})
    if details:
        summary["per_question"] = [msgspec.to_builtins(r.__dict__) for r in results]
    if summary["answered_fraction"] is not None and summary["answered_fraction"] < 0.5:
        log.warning("only %.0f%% of the candidates have an answer eval.answer_regex=%r extracts: is it this "
                    "task's?", 100 * summary["answered_fraction"], cfg.eval.answer_regex)
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(summary, indent=2))
    return summary
