"""What changes a running engine between its steps: a weight load and the
attention window (sparse rollouts). Both pause generation in place, change
every worker, and have the running requests recomputed under the change;
`GeneratorService` runs them one at a time, beside its requests."""

from __future__ import annotations

import asyncio
import logging
import time

from stream_rl.generator.engine import pause_in_place
from stream_rl.protocol import (AttentionWindowSet, SetAttentionWindow, UpdateWeights, WeightsUpdated,
                                WeightsUpdateFailed)
from stream_rl.weights_sync.buckets import SCHEME as TORCH_DIST
from stream_rl.weights_sync.buckets import decode_uri, group_key

log = logging.getLogger(__name__)


async def while_paused(engine, method: str, args: tuple = (), then=None) -> list:
    """`method` on every worker of `engine` (then `then()`) with generation
    paused, and the running requests and every cached prefix recomputed
    before it resumes; the workers' results."""
    # "keep" freezes running requests in place; they continue after
    # resume, recomputed under what changed.
    await pause_in_place(engine)
    try:
        results = await engine.collective_rpc(method, args=args)
        if then is not None:
            await then()
        # The running requests' KV and every cached prefix were computed
        # before the change. The running requests are preempted, so their
        # prompt and tokens so far are prefilled again (AReaL's
        # interrupt-and-recompute) and their later tokens are exactly the
        # new state's; vLLM won't drop a prefix cache that running requests
        # still hold, so without the preemption later requests would
        # attend to blocks of the old state.
        if not await engine.reset_prefix_cache(reset_running_requests=True):
            log.warning("vLLM did not reset its prefix cache after %s", method)
        return results
    finally:
        await engine.resume_generation()


class EngineUpdates:
    """Mixed into `GeneratorService`: uses its `engine`, `outbox`, `cfg`,
    `index`, `version`, `window`, `_receiving` and `_abandon`."""

    async def _update_weights(self, msg: UpdateWeights) -> None:
        t0 = time.perf_counter()
        try:
            if msg.version <= self.version:
                raise ValueError(f"version {msg.version} is not above the serving version {self.version}")
            if msg.uri.startswith(TORCH_DIST):
                # The workers receive in the background while generation
                # goes on; only loading the staged weights pauses it.
                # The k-th receiver's workers are ranks 1 + k x tp + worker of the group.
                group = decode_uri(msg.uri)["group"]
                members = group.get("members", list(range(self.cfg.generator.count)))
                if self.index not in members:
                    raise ValueError(f"generator {self.index} is not a receiver of this transfer ({members})")
                first_rank = 1 + members.index(self.index) * self.cfg.generator.tensor_parallel_size
                await self.engine.collective_rpc("stream_rl_stage_weights", args=(msg.uri, first_rank))
                self._receiving = group_key(group)
                while True:
                    if self._abandon:
                        raise RuntimeError("abandoned: a transfer over a new group replaced it (a peer was lost)")
                    states = await self.engine.collective_rpc("stream_rl_staging_state")
                    errors = [s for s in states if s.startswith("error")]
                    if errors:
                        raise RuntimeError(f"weight transfer failed: {errors[0]}")
                    if all(s == "done" for s in states):
                        break
                    await asyncio.sleep(0.005)
                load = ("stream_rl_apply_staged", ())
            else:
                load = ("stream_rl_load_weights_from_file", (msg.uri,))
        except Exception as err:
            log.exception("weight update to version %d failed before loading; version %d serves on",
                          msg.version, self.version)
            self._receiving, self._abandon = None, False
            await self.outbox.send(WeightsUpdateFailed(version=msg.version, error=f"{type(err).__name__}: {err}"))
            return
        self._receiving, self._abandon = None, False

        async def label() -> None:
            # The engine labels every later step with this version; tokens
            # take their version from that label (see token_versions).
            await self.engine.update_weight_version(str(msg.version))
            self.version = msg.version

        t_pause = time.perf_counter()
        try:
            await while_paused(self.engine, *load, then=label)
        except Exception as err:
            log.exception("weight update to version %d failed", msg.version)
            await self.outbox.send(WeightsUpdateFailed(version=msg.version, error=f"{type(err).__name__}: {err}"))
            return
        pause_s = time.perf_counter() - t_pause
        await self.outbox.send(WeightsUpdated(version=self.version, load_s=time.perf_counter() - t0,
                                              pause_s=pause_s))

    async def _set_window(self, msg: SetAttentionWindow) -> None:
        """The sparsity knob: every worker's attention window, the running
        requests recomputed under it, as after a weight load."""
        try:
            layers = await while_paused(self.engine, "stream_rl_set_attention_window", (msg.window,))
        except Exception as err:  # this engine cannot: said so, and its window stays
            log.exception("attention window %d not set", msg.window)
            await self.outbox.send(AttentionWindowSet(window=self.window, layers=0,
                                                      error=f"{type(err).__name__}: {err}"))
            return
        self.window = msg.window
        await self.outbox.send(AttentionWindowSet(window=msg.window, layers=sum(layers)))
