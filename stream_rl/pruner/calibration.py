"""ARRoL's online binned calibration: head score -> posterior P(Y=1 | score).

The head's raw score drifts as it trains, so its sigmoid s' is not read as a
probability. Scores are binned (b = min(B-1, floor(B s'))) and each bin's
posterior comes from recent labelled rollouts by Bayes' rule with Laplace
smoothing (ARRoL, appendix A.4):

    P(b | Y=y) = (c_b^y + alpha) / (sum_b' c_b'^y + alpha B)
    q(b) = pi P(b|1) / (pi P(b|1) + (1 - pi) P(b|0))

Positives and negatives sit in two sliding buffers of `window` scores each,
so a rare class keeps as many examples as a common one. The prior pi is
therefore not their size ratio (two full buffers would always say 0.5) but
the positive rate over the last `window` labels of either class.
"""

from __future__ import annotations

from collections import deque

import numpy as np


def score_bins(s: np.ndarray | float, bins: int) -> np.ndarray:
    """Bin index of each score in [0, 1] (values outside are clipped)."""
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, 1.0)
    return np.minimum(bins - 1, np.floor(bins * s)).astype(np.int64)


def binned_posterior(c_pos: np.ndarray, c_neg: np.ndarray, prior: float, alpha: float) -> np.ndarray:
    """q(b) for every bin from per-bin label counts, a prior and smoothing."""
    c_pos = np.asarray(c_pos, dtype=np.float64)
    c_neg = np.asarray(c_neg, dtype=np.float64)
    bins = len(c_pos)
    like_pos = (c_pos + alpha) / (c_pos.sum() + alpha * bins)
    like_neg = (c_neg + alpha) / (c_neg.sum() + alpha * bins)
    num = prior * like_pos
    den = num + (1.0 - prior) * like_neg
    # prior 0 or 1 with alpha > 0 keeps den > 0; guard anyway.
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), prior)


class BinnedCalibrator:
    def __init__(self, bins: int = 128, alpha: float = 1.0, window: int = 2048):
        if bins < 1 or alpha <= 0 or window < 1:
            raise ValueError(f"bins ({bins}) and window ({window}) must be >= 1 and alpha ({alpha}) > 0")
        self.bins, self.alpha = bins, alpha
        self._scores = {True: deque(maxlen=window), False: deque(maxlen=window)}
        self._counts = {True: np.zeros(bins, np.int64), False: np.zeros(bins, np.int64)}
        self._labels: deque[bool] = deque(maxlen=window)
        self._table: np.ndarray | None = None  # q per bin, rebuilt lazily

    def observe(self, score: float, label: bool) -> None:
        """A rollout whose head score was `score` (in [0, 1]) ended with `label`."""
        label = bool(label)
        buf, counts = self._scores[label], self._counts[label]
        b = int(score_bins(score, self.bins))
        if len(buf) == buf.maxlen:
            counts[buf[0]] -= 1  # the deque drops it on append
        buf.append(b)
        counts[b] += 1
        self._labels.append(label)
        self._table = None

    @property
    def num_labels(self) -> int:
        return len(self._labels)

    @property
    def prior(self) -> float:
        """P(Y=1) over the recent labels; 0.5 before any."""
        return sum(self._labels) / len(self._labels) if self._labels else 0.5

    def table(self) -> np.ndarray:
        """q for every bin."""
        if self._table is None:
            self._table = binned_posterior(self._counts[True], self._counts[False], self.prior, self.alpha)
        return self._table

    def posterior(self, score: np.ndarray | float) -> np.ndarray:
        """q(s') for scores in [0, 1] (array in, array out)."""
        return self.table()[score_bins(score, self.bins)]

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        return self._counts[True].copy(), self._counts[False].copy()

    def state_dict(self) -> dict:
        """The windows (bin indices and labels, oldest first), JSON-able."""
        return {"bins": self.bins, "pos": [int(b) for b in self._scores[True]],
                "neg": [int(b) for b in self._scores[False]], "labels": [bool(y) for y in self._labels]}

    def load_state_dict(self, state: dict) -> None:
        """Windows from `state_dict` (a smaller window keeps the newest); the
        counts are the windows' bin counts, as `observe` keeps them."""
        if state["bins"] != self.bins:
            raise ValueError(f"calibrator state has {state['bins']} bins; this calibrator has {self.bins}")
        for label, key in ((True, "pos"), (False, "neg")):
            self._scores[label].clear()
            self._scores[label].extend(int(b) for b in state[key])
            self._counts[label] = np.bincount(np.asarray(self._scores[label], dtype=np.int64),
                                              minlength=self.bins).astype(np.int64)
        self._labels.clear()
        self._labels.extend(bool(y) for y in state["labels"])
        self._table = None
