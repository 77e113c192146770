"""The roles as separate processes over TCP on loopback, started the way a
multi-host launch starts them: two `stream-rl generator --index i`, a
`stream-rl learner` and a `stream-rl controller`. The learner and the
controller are killed with SIGKILL mid-run and restarted with --resume
against the generators, which keep running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import msgspec
import pytest

from stream_rl.transport import free_ports
from tests.conftest import cfg_with, logprob_gaps_within

pytestmark = pytest.mark.engine

# Enough steps after the resume that some train tokens of the learner's own
# version (the log-prob gap check needs one): with 6, one full run in four
# had none in the 4 steps after the resume.
STEPS = 8


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_until(what: str, cond, procs, timeout_s: float = 900.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"a role exited while waiting for {what}: {dead}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _metrics(run) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_roles_over_tcp_killed_and_resumed(engine_cfg, tmp_path):
    from stream_rl.buffer.recycling import BufferState
    from stream_rl.learner.checkpoint import CONTROLLER_FILE, find_checkpoint
    from stream_rl.roles import start_role

    base = free_ports(6, consecutive=True)[0]
    lport = [base + 4, base + 5]
    cfg = cfg_with(engine_cfg, generator__count=2, generator__request_addr=f"tcp://127.0.0.1:{base}",
                   generator__stream_addr=f"tcp://127.0.0.1:{base + 1}", generator__target_groups=6,
                   learner__addr=f"tcp://127.0.0.1:{lport[0]}", learner__reply_addr=f"tcp://127.0.0.1:{lport[1]}",
                   weights_sync__backend="torch_dist", weights_sync__timeout_s=120.0, pruner__mode="arrol",
                   pruner__cold_start_steps=1, pruner__min_head_auc=0.0, run__checkpoint_every=2)
    cfg_path = tmp_path / "config.json"
    cfg_path.write_bytes(msgspec.json.encode(cfg))
    run = tmp_path / "run"
    run.mkdir()
    roles = []

    def start(name, args):
        proc, log = start_role(["-m", "stream_rl", *args, "--config", str(cfg_path)], tmp_path / f"{name}.log")
        roles.append((proc, log))
        return proc

    def start_job(resume: bool):
        again = ["--resume"] if resume else []
        learner = start("learner" + "-2" * resume,
                        ["learner", "--out", str(run)] + (["--resume", str(run / "checkpoint")] if resume else []))
        ctrl = start("controller" + "-2" * resume, ["controller", "--out", str(run), "--max-steps", str(STEPS)]
                     + again)
        return learner, ctrl

    try:
        gens = [start(f"generator-{i}", ["generator", "--index", str(i)]) for i in range(2)]
        learner, ctrl = start_job(resume=False)

        # Killed once a checkpoint exists and the run has gone on past it
        # (work the resumed run must redo, and must not train twice).
        def checkpoint_and_beyond():
            try:
                ck = find_checkpoint(run / "checkpoint")
                step = json.loads((ck / CONTROLLER_FILE).read_text())["step"]
            except (FileNotFoundError, json.JSONDecodeError):
                return None
            done = [r["step"] for r in _metrics(run)]
            return step if done and max(done) > step and step < STEPS - 1 else None

        _wait_until("a checkpoint and a step after it", checkpoint_and_beyond, [learner, ctrl, *gens])
        _kill(ctrl)
        _kill(learner)
        ck = find_checkpoint(run / "checkpoint")
        k = json.loads((ck / CONTROLLER_FILE).read_text())["step"]
        state = msgspec.msgpack.decode((ck / "buffer.msgpack").read_bytes(), type=BufferState)
        ready_at_kill = {g.group_id for g in state.ready}
        open_at_kill = {members[0].group_id for members in state.groups}
        trained_before = {gid for r in _metrics(run) if r["step"] <= k for gid in r["group_ids"]}

        learner2, ctrl2 = start_job(resume=True)
        assert ctrl2.wait(900) == 0, (tmp_path / "controller-2.log").read_text()[-4000:]
        # The controller tells every role to exit at the end.
        for p in (learner2, *gens):
            assert p.wait(120) == 0
    finally:
        for proc, log in roles:
            _kill(proc)
            log.close()

    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # No sample trained twice: every group id once over the whole run,
    # including those before the kill.
    trained = [gid for r in records for gid in r["group_ids"]]
    assert len(trained) == len(set(trained)) and trained_before <= set(trained)
    after = {gid for r in records if r["step"] > k for gid in r["group_ids"]}
    # None lost: the groups complete at the checkpoint are trained after the
    # resume; the open ones are trained or still in the final buffer.
    final = msgspec.msgpack.decode((run / "buffer.msgpack").read_bytes(), type=BufferState)
    left = {g.group_id for g in final.ready} | {members[0].group_id for members in final.groups}
    assert ready_at_kill <= after
    assert open_at_kill <= after | left
    # Both generators served both runs and serve the last weights.
    summary = json.loads((run / "summary.json").read_text())
    assert min(summary["requests_per_generator"]) > 0
    assert len(set(summary["generator_versions"])) == 1
    assert logprob_gaps_within([r for r in records if r["step"] > k])
    assert sum(r["prune/pruned"] for r in records[1:]) > 0  # head scores reach the controller
    assert (run / "final_model" / "config.json").is_file()
