"""Controller-side handle on a generator: its process and its two channels."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import msgspec

from stream_rl.config import Config, generator_addrs
from stream_rl.codec import Decoder
from stream_rl.protocol import (AbortRequests, AttentionWindowSet, FromGenerator, GeneratorReady, RequestRejected,
                                RolloutRequest, SetAttentionWindow, Shutdown, UpdateWeights, WeightsUpdated,
                                WeightsUpdateFailed, unbatched)
from stream_rl.placement import Placement, format_cores
from stream_rl.roles import died, start_role, stop_role, stop_roles
from stream_rl.transport import ZmqChannel, caps, ms_until


class GeneratorError(RuntimeError):
    pass


class GeneratorClient:
    """Send requests to a generator and receive its stream (blocking)."""

    def __init__(self, cfg: Config, index: int = 0):
        g = cfg.generator
        request_addr, stream_addr = generator_addrs(g, index)
        self.index = index
        cap, _ = caps(cfg)
        self.requests = ZmqChannel(request_addr, send=True, bind=False, hwm=g.hwm, run=cfg.run.id, cap=cap)
        self.stream = ZmqChannel(stream_addr, send=False, bind=False, hwm=g.hwm, cap=cap,
                                 decoder=Decoder(FromGenerator, cfg.run.id))
        self.version = 0
        self.hung = False  # the pool found it silent with requests running
        self.recovered: set[str] = set()  # (a pool's: requests a lost generator's loss ended)
        # Messages that arrived while waiting for a specific reply; handed
        # out by recv() in arrival order so nothing is lost.
        self._backlog: deque = deque()

    def submit(self, req: RolloutRequest) -> None:
        self.requests.send(req)

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self.requests.send(AbortRequests(request_ids=list(request_ids)))

    def recv(self, timeout_ms: int | None = None):
        """The next message (a TokenBatch's one by one), or None on timeout."""
        if self._backlog:
            return self._backlog.popleft()
        return self._read_stream(timeout_ms)

    def take(self) -> list:
        """Without waiting: what was set aside, then the stream's next
        message if one is there (a TokenBatch's messages, in order)."""
        msgs = list(self._backlog)
        self._backlog.clear()
        msg = self.stream.recv(0)
        if msg is not None:
            msgs += unbatched(msg)
        return msgs

    def _read_stream(self, timeout_ms: int | None):
        msg = self.stream.recv(timeout_ms)
        if msg is None:
            return None
        first, *rest = unbatched(msg)
        self._backlog.extend(rest)
        return first

    def _wait_for(self, kinds: tuple, timeout_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GeneratorError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            msg = self.stream.recv(ms_until(min(deadline, time.monotonic() + 1.0)))
            if msg is None:
                self.check_alive()
                continue
            if isinstance(msg, kinds):
                return msg
            self._backlog.extend(unbatched(msg))

    def exit_cause(self) -> str | None:
        """Why the generator is known to be gone, or None (alive, or run
        elsewhere: then only its silence tells)."""
        return None

    def check_alive(self) -> None:
        """Raise GeneratorError if the generator is known to be gone."""
        cause = self.exit_cause()
        if cause:
            raise GeneratorError(cause)

    def kill(self) -> None:
        """Stop it at once, if it is this host's to stop."""

    def wait_ready(self, timeout_s: float) -> GeneratorReady:
        msg = self._wait_for((GeneratorReady,), timeout_s, "the generator to start")
        self.version = msg.version
        return msg

    def update_weights(self, version: int, uri: str, timeout_s: float = 600.0) -> WeightsUpdated:
        self.requests.send(UpdateWeights(version=version, uri=uri))
        msg = self._wait_for((WeightsUpdated, WeightsUpdateFailed), timeout_s, f"weights version {version}")
        if isinstance(msg, WeightsUpdateFailed):
            raise GeneratorError(f"generator failed to load weights version {version}: {msg.error}")
        self.version = msg.version
        return msg

    def set_attention_window(self, window: int, timeout_s: float = 120.0) -> AttentionWindowSet:
        """Sparse rollouts: attend to the last `window` tokens (0: dense)."""
        self.requests.send(SetAttentionWindow(window=window))
        msg = self._wait_for((AttentionWindowSet,), timeout_s, f"attention window {window}")
        if msg.error:
            raise GeneratorError(f"generator did not set attention window {window}: {msg.error}")
        return msg

    def close(self) -> None:
        self.requests.close()
        self.stream.close()


class GeneratorProcess(GeneratorClient):
    """Starts `stream-rl generator` as a child process and connects to it."""

    def __init__(self, cfg: Config, workdir: Path, log_path: Path | None = None, index: int = 0,
                 wait: bool = True, placement: Placement | None = None):
        """`wait=False` returns once the process is started; call
        `wait_ready` before using it (several engines then load at once).
        `placement`: the cores of its engine and of its front end."""
        workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = workdir / "generator_config.json"
        cfg_path.write_bytes(msgspec.json.encode(cfg))
        tag = f"-{index}" if index else ""
        cmd = ["-m", "stream_rl", "generator", "--config", str(cfg_path), "--index", str(index)]
        if placement is not None:
            cmd += ["--engine-cpus", format_cores(placement.engines[index]), "--front-cpus", format_cores(placement.rest)]
        self.proc, self._log = start_role(cmd, log_path or workdir / f"generator{tag}.log")
        super().__init__(cfg, index)
        if wait:
            self.wait_ready(cfg.generator.startup_timeout_s)

    def wait_ready(self, timeout_s: float) -> GeneratorReady:
        try:
            return super().wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def exit_cause(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return died(f"generator {self.index}", self.proc, Path(self._log.name))

    def kill(self) -> None:
        """SIGKILL it and everything of its session (its engine)."""
        stop_role(self.proc, lambda: None, 0.0)
        self._log.close()

    def stopping(self, timeout_s: float = 30.0) -> tuple:
        """Its part in `roles.stop_roles`: asked by a Shutdown (a hung one would not answer)."""
        return self.proc, lambda: self.requests.send(Shutdown()), 2.0 if self.hung else timeout_s

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_roles([self.stopping(timeout_s)])
        self.release()

    def release(self) -> None:
        """Its sockets and log, once the process is gone."""
        self.close()
        self._log.close()


__all__ = ["GeneratorClient", "GeneratorProcess", "GeneratorError", "RequestRejected"]
