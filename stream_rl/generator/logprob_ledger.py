"""The generator service's side of the worker's log-prob reports.

The engine streams a request's tokens through vLLM's output path and the
worker reports their log-probs over a side channel (`WorkerLogprobs`), so a
token can arrive before its log-prob. The ledger keeps each open request's
log-probs by output position until its tokens go out, and lets the
request's task wait for the ones not in yet.
"""

from __future__ import annotations

import asyncio
import logging
import math

from stream_rl.protocol import WorkerLogprobs

log = logging.getLogger(__name__)


class LogprobsLost(RuntimeError):
    pass


class LogprobLedger:
    def __init__(self, timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self._values: dict[str, list[float]] = {}
        # key -> (positions needed, future set once they are all in)
        self._waiters: dict[str, tuple[int, asyncio.Future]] = {}
        self._serial = 0

    def open(self, request_id: str) -> str:
        """A fresh key for one engine request (a request id can come back
        as a continuation: a late report for the earlier one must not land
        in the later one's ledger)."""
        self._serial += 1
        key = f"{request_id}#{self._serial}"
        self._values[key] = []
        return key

    def close(self, key: str) -> None:
        self._values.pop(key, None)
        waiter = self._waiters.pop(key, None)
        if waiter is not None and not waiter[1].done():
            waiter[1].cancel()

    def add(self, msg: WorkerLogprobs) -> None:
        for key, pos, lp in zip(msg.keys, msg.index, msg.logprobs):
            values = self._values.get(key)
            if values is None:
                continue  # its request ended: every token it streamed had its log-prob
            if pos >= len(values):
                if pos > len(values):
                    log.error("log-probs of output positions %d-%d of %s never arrived", len(values), pos - 1, key)
                    values.extend([math.nan] * (pos - len(values)))
                values.append(lp)
            else:  # a position sampled again (vLLM reran the step)
                values[pos] = lp
            waiter = self._waiters.get(key)
            if waiter is not None and len(values) >= waiter[0]:
                del self._waiters[key]
                if not waiter[1].done():
                    waiter[1].set_result(None)

    async def get(self, key: str, start: int, end: int) -> list[float]:
        """The log-probs of output positions [start, end), once all are in."""
        values = self._values[key]
        if len(values) < end:
            future = asyncio.get_running_loop().create_future()
            self._waiters[key] = (end, future)
            try:
                await asyncio.wait_for(future, self.timeout_s)
            except asyncio.TimeoutError:
                raise LogprobsLost(f"the worker reported log-probs of {len(values)} of the {end} tokens of {key} "
                                   f"within {self.timeout_s:.0f} s") from None
            finally:
                self._waiters.pop(key, None)
        out = values[start:end]
        if any(math.isnan(v) for v in out):
            raise LogprobsLost(f"the worker's report of a log-prob in output positions {start}-{end - 1} of {key} "
                               "was lost")
        return out
