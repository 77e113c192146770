"""`stream-rl train --launcher ray` on a real Ray cluster made here: a head
and a second node started with `ray start` on this machine, each offering a
custom resource of its own, so where each role ran is observable. The tiny
world trains with its generator on one node and its learner on the other;
then a generator process is killed mid-run, reported with its node and
cause, and started again through its actor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.engine

ray = pytest.importorskip("ray")
RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}


def _ray(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([RAY, *args], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 or not check, f"ray {' '.join(args)}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes on this machine: `gen_node` on the head, `learn_node` on the other."""
    port = free_port()
    temp = Path(f"/tmp/srl-ray-{os.getpid()}")  # unix socket paths must stay short
    # Ray's workers take ports from 10002-19999 by default, which overlaps the
    # band stream_rl picks the head's and the roles' ports from (free_port).
    common = ["--num-cpus", "2", "--object-store-memory", str(100 * 2 ** 20), "--disable-usage-stats",
              "--min-worker-port", "10002", "--max-worker-port", "16383"]
    try:
        _ray("start", "--head", "--port", str(port), "--temp-dir", str(temp), "--include-dashboard=false",
             "--resources", json.dumps({"gen_node": 1}), *common)
        _ray("start", "--address", f"127.0.0.1:{port}", "--resources", json.dumps({"learn_node": 1}), *common)
        nodes = json.loads(subprocess.run(
            [sys.executable, "-c", "import json, ray; ray.init(address=%r, log_to_driver=False); "
             "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() "
             "if n['Alive']]))" % f"127.0.0.1:{port}"], env=ENV, capture_output=True, text=True, timeout=120,
            check=True).stdout.strip().splitlines()[-1])
        yield {"address": f"127.0.0.1:{port}", "nodes": nodes}
    finally:
        _ray("stop", "--force", check=False)
        shutil.rmtree(temp, ignore_errors=True)


def _node_with(nodes: list[dict], resource: str) -> str:
    (node,) = [n["id"] for n in nodes if resource in n["resources"]]
    return node


def _train(cluster, tiny_world, out: Path, steps: int, *extra: str) -> subprocess.Popen:
    d = tiny_world["dir"]
    cmd = [sys.executable, "-m", "stream_rl", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--launcher", "ray", "--out", str(out), "--max-steps", str(steps),
           "--set", f"model.path={d / 'model'}", "--set", f"data.path={d / 'data' / 'train.jsonl'}",
           "--set", f"ray.address={cluster['address']}", "--set", "ray.generator_resources={gen_node: 1}",
           "--set", "ray.learner_resources={learn_node: 1}", "--set", "run.checkpoint_every=0",
           "--set", "run.progress=false", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout_s: float = 600.0) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the job did not finish in {timeout_s:.0f} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def _summary(out: str) -> dict:
    start = out.index("\n{\n")
    return json.loads(out[start: out.index("\n}\n", start) + 2])


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_roles_placed_on_their_nodes(cluster, tiny_world, tmp_path):
    t0 = time.monotonic()
    out = _finish(_train(cluster, tiny_world, tmp_path / "run", 5))
    wall = time.monotonic() - t0
    summary = _summary(out)
    where = {(p["role"], p.get("index", p.get("node_rank"))): p for p in summary["placement"]}
    assert where[("generator", 0)]["node_id"] == _node_with(cluster["nodes"], "gen_node")
    assert where[("learner", 0)]["node_id"] == _node_with(cluster["nodes"], "learn_node")
    assert where[("generator", 0)]["bundle"] == {"CPU": 1.0, "gen_node": 1.0}
    assert json.loads((tmp_path / "run" / "placement.json").read_text()) == summary["placement"]
    # Every step's record, each with the keys of the first (nothing dropped on the way).
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r.keys() == records[0].keys() for r in records)
    for key in ("reward_policy_mean", "gen_tokens_per_s", "policy_version", "step_s", "tokens_trained"):
        assert all(r[key] is not None for r in records), key
    assert summary["steps"] == 5 and summary["policy_version"] == 5 and summary["tokens_trained"] > 0
    # Both roles' logs reached the driver's run directory.
    logs = tmp_path / "run" / "logs"
    assert "StreamRLWorkerExtension" in (logs / "generator-0.log").read_text()  # its engine's own output
    assert "Loading weights" in (logs / "learner-node0.log").read_text()
    assert (tmp_path / "run" / "final_model").is_dir()  # the learner, on the other node, saved into OUT
    launch = summary["launch"]
    print(json.dumps({"wall_s": round(wall, 1), **{k: round(v, 2) for k, v in launch.items() if k != "launcher"},
                      "startup_s": round(summary["startup_s"], 1), "wall_train_s": round(summary["wall_s"], 1)}))


def test_a_learner_over_two_nodes_trains_as_one_torch_distributed_job(cluster, tiny_world, tmp_path):
    """learner.ranks 2 over ray.learner_nodes 2: torchrun in each node's
    actor, a static rendezvous at the first; the ranks train data-parallel."""
    out = _finish(_train(cluster, tiny_world, tmp_path / "run", 3, "--set", "learner.ranks=2",
                         "--set", "ray.learner_nodes=2", "--set", "ray.learner_resources={}"))
    summary = _summary(out)
    learners = [p for p in summary["placement"] if p["role"] == "learner"]
    assert [p["node_rank"] for p in learners] == [0, 1]
    assert len({p["node_id"] for p in learners}) == 2  # STRICT_SPREAD: one machine each
    assert "2 learner rank(s)" in out
    assert summary["steps"] == 3 and summary["policy_version"] == 3
    for k in (0, 1):
        log = (tmp_path / "run" / "logs" / f"learner-node{k}.log").read_text()
        assert "Loading weights" in log, log[-2000:]


def _generator_pid(run: Path) -> int:
    pids = subprocess.run(["pgrep", "-f", f"stream_rl generator --config {run / 'ray_job_config.json'}"],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    return int(pids[0])


def _wait_steps(proc: subprocess.Popen, run: Path, n: int) -> None:
    deadline = time.monotonic() + 600
    while len(_metrics(run)) < n:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.5)


def test_a_lost_generator_is_reported_with_its_node_and_started_again(cluster, tiny_world, tmp_path):
    """Its process killed, then its actor (as when its node goes): each loss
    is reported with the node and the cause, and the generator comes back
    through a new process, then a new actor in its bundle."""
    run = tmp_path / "run"
    proc = _train(cluster, tiny_world, run, 12, "--set", "generator.max_restarts=2",
                  "--set", "generator.restart_backoff_s=0.5")
    _wait_steps(proc, run, 2)
    os.kill(_generator_pid(run), signal.SIGKILL)
    # Its actor next, once the generator is back and serving (steps go on
    # meanwhile from what the lost one left).
    deadline = time.monotonic() + 300
    while not any(r.get("generator_restarts") == 1 and r.get("generators_live") == 1 for r in _metrics(run)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.5)
    actor = int(subprocess.run(["ps", "-o", "ppid=", "-p", str(_generator_pid(run))], capture_output=True,
                               text=True).stdout)
    assert "RoleHost" in Path(f"/proc/{actor}/cmdline").read_text()
    os.kill(actor, signal.SIGKILL)
    out = _finish(proc)
    lost = [line for line in out.splitlines() if "generator 0 lost:" in line]
    assert len(lost) == 2, out[-4000:]
    assert all("on node" in line and "Ray node" in line for line in lost)
    assert "killed by SIGKILL" in lost[0] and "its Ray actor died" in lost[1]
    summary = _summary(out)
    assert summary["steps"] == 12
    # Three engines in its log (first, after its process, after its actor) and it serves the last weights.
    assert (run / "logs" / "generator-0.log").read_text().count("StreamRLWorkerExtension") == 3
    assert summary["generator_versions"] == [summary["policy_version"] + 1]
