"""Controller-side handle on the learner: its channels, and its process when
`stream-rl train` starts it on this host."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec

from stream_rl.config import Config
from stream_rl.codec import Decoder
from stream_rl.protocol import FromLearner, LearnerFailed, LearnerReady, Shutdown
from stream_rl.roles import died, start_role, stop_roles
from stream_rl.transport import ThrottledLog, ZmqChannel, caps, free_ports


log = logging.getLogger(__name__)


class LearnerError(RuntimeError):
    pass


class ReplyWaiter:
    """Waiting for one kind of reply, on the clock the learner runs on
    (the real one here; the simulator's virtual one, `benchmarks/simulate/`)."""

    def now(self) -> float:
        return time.monotonic()

    def wait_for(self, kind, timeout_s: float, what: str, match=None, key: str | None = None):
        """The next reply of type `kind` (and for which `match(reply)`);
        any other reply on the way is skipped."""
        deadline = self.now() + timeout_s
        while self.now() < deadline:
            msg = self.recv(1000)
            if msg is None:
                continue
            if isinstance(msg, kind) and (match is None or match(msg)):
                return msg
            self.skip(msg, what)
        raise self.hangs(what, timeout_s, key)


class LearnerClient(ReplyWaiter):
    def __init__(self, cfg: Config):
        lc = cfg.learner
        cap, batch_cap = caps(cfg)
        self.replies = ZmqChannel(lc.reply_addr, send=False, bind=True, hwm=cfg.generator.hwm, cap=cap,
                                  decoder=Decoder(FromLearner, cfg.run.id))
        self.batches = ZmqChannel(lc.addr, send=True, bind=False, hwm=cfg.generator.hwm, run=cfg.run.id,
                                  cap=batch_cap)
        self.stray = 0  # well-formed replies nobody waited for (`skip`)
        self._stray_log = ThrottledLog(log)
        self.hung = False  # it stopped answering (`hangs`): its stop is not waited out

    def send(self, msg) -> None:
        self.batches.send(msg)

    def recv(self, timeout_ms: int | None = None):
        """The learner's next message (None on timeout); a failure is raised."""
        msg = self.replies.recv(timeout_ms)
        if msg is None:
            self.check_alive()
        elif isinstance(msg, LearnerFailed):
            raise LearnerError(f"the learner failed: {msg.error}")
        return msg

    def wait_ready(self, timeout_s: float) -> LearnerReady:
        return self.wait_for(LearnerReady, timeout_s, "the learner to start", key="learner.startup_timeout_s")

    def hangs(self, what: str, waited_s: float, key: str | None = None) -> LearnerError:
        """The error for a learner that has not answered `what` in
        `waited_s` (a stopped process, a stuck collective); `key` is the
        config key that set the wait."""
        self.hung = True
        return LearnerError(f"timed out after {waited_s:.0f} s waiting for {what}: the learner hangs"
                            + (f" ({key})" if key else ""))

    def skip(self, msg, waiting_for: str) -> None:
        """A well-formed reply nobody asked for: a duplicate, a stale
        learner's from an earlier job on this port, or a forged one. It is
        counted and logged (at most once a second), not obeyed."""
        self.stray += 1
        self._stray_log(logging.WARNING, "skipped an unexpected %s on the learner's reply socket while waiting "
                        "for %s (%d so far)", msgspec.json.encode(msg).decode()[:200], waiting_for, self.stray)

    def check_alive(self) -> None:
        """Raise LearnerError if the learner is known to be gone."""

    def close(self) -> None:
        self.batches.close()
        self.replies.close()


class LearnerProcess(LearnerClient):
    """Starts `stream-rl learner` (under torchrun for learner.ranks > 1)."""

    def __init__(self, cfg: Config, out_dir: Path, resume: Path | None = None, cpus: list[int] | None = None):
        """`cpus`: the cores its ranks run on (stream_rl.placement)."""
        super().__init__(cfg)  # bind the reply channel before the learner connects
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = out_dir / "learner_config.json"
        cfg_path.write_bytes(msgspec.json.encode(cfg))
        cmd = ["-m", "stream_rl", "learner", "--config", str(cfg_path), "--out", str(out_dir)]
        if resume is not None:
            cmd += ["--resume", str(resume)]
        n = cfg.learner.ranks
        if n > 1:
            cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(n),
                   "--master_port", str(free_ports(1)[0])] + cmd
        self.proc, self._log = start_role(cmd, out_dir / "learner.log", cpus)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise LearnerError(died("learner", self.proc, Path(self._log.name)))

    def stop(self, timeout_s: float = 60.0) -> None:
        """Ask it to save its final model and exit; kill it if it does not
        (at once, nearly, if it hangs: it would not answer)."""
        stop_roles([self.stopping(timeout_s)])
        self.release()

    def stopping(self, timeout_s: float = 60.0) -> tuple:
        """Its part in `roles.stop_roles`."""
        return self.proc, lambda: self.send(Shutdown()), 2.0 if self.hung else timeout_s

    def release(self) -> None:
        """Its sockets and log, once the process is gone."""
        self.close()
        self._log.close()
