"""examples/slurm/stream_rl.sbatch: the commands its dry run renders parse
with the CLI's (and torchrun's) own parsers, load the job's config with their
overrides, and wire every role to the others' nodes; outside a dry run it
stops the job when a role fails and ends it with the controller."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc
from torch.distributed.run import get_args_parser as torchrun_parser

from stream_rl.cli import build_parser
from stream_rl.config import config_to_dict, generator_addrs, load_config, split_address

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "slurm" / "stream_rl.sbatch"
JOB_ID = "4242"
# The dry run's line: "+ ROLE HOST: COMMAND" (COMMAND shell-quoted).
LINE = re.compile(r"\+ (generator|learner|controller) (\S+): (.+)")

# `scontrol show hostnames LIST` for the hostlists a test allocates:
# name[01-02] (zero-padded ranges, lists in brackets), a,b, single names.
FAKE_SCONTROL = r'''
import re, sys

def expand(hostlist):
    hosts = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.extend(prefix + str(n).zfill(len(lo)) + rest for rest in (expand(suffix) or [""]))
    return hosts

assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\n".join(expand(sys.argv[3])))
'''


def _srun_parser() -> argparse.ArgumentParser:
    """The srun options the template may use; any other fails the test."""
    p = argparse.ArgumentParser(prog="srun", exit_on_error=False)
    p.add_argument("--het-group", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--ntasks", type=int, required=True)
    p.add_argument("-w", dest="nodelist", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--gres", required=True)
    p.add_argument("--cpus-per-task", type=int, required=True)
    p.add_argument("--overlap", action="store_true")
    return p


@dataclass
class Launch:
    role: str
    host: str
    srun: argparse.Namespace
    args: argparse.Namespace  # the stream-rl command's
    torchrun: argparse.Namespace | None  # the learner's launcher

    @property
    def cfg(self):
        return load_config(self.args.config, self.args.overrides)


def _parse(line: str) -> Launch:
    m = LINE.fullmatch(line)
    assert m, f"not a dry-run line: {line!r}"
    role, host, command = m.groups()
    words = shlex.split(command)
    k = next(i for i, w in enumerate(words) if w in ("stream-rl", "torchrun"))
    assert words[0] == "srun", line
    srun = _srun_parser().parse_args(words[1:k])
    torchrun = None
    argv = words[k + 1:]
    if words[k] == "torchrun":
        torchrun = torchrun_parser().parse_args(argv)
        assert torchrun.module and torchrun.training_script == "stream_rl", line
        argv = torchrun.training_script_args
    args = build_parser().parse_args(argv)
    assert args.cmd == role, line
    return Launch(role, host, srun, args, torchrun)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!{sys.executable}\n{FAKE_SCONTROL}")
    scontrol.chmod(0o755)
    return bin_dir


def _env(fake_bin: Path, generators: str, learners: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{fake_bin}:{env['PATH']}", SLURM_JOB_ID=JOB_ID, SLURM_SUBMIT_DIR=str(REPO),
               SLURM_JOB_NODELIST_HET_GROUP_0=generators, SLURM_JOB_NODELIST_HET_GROUP_1=learners,
               SLURM_JOB_CPUS_PER_NODE_HET_GROUP_0="64(x2)", SLURM_JOB_CPUS_PER_NODE_HET_GROUP_1="96",
               CONFIG="configs/tiny.yaml", OUT=str(fake_bin.parent / "run"))
    env.update(extra)
    return env


def render(fake_bin: Path, generators: str, learners: str, **extra: str) -> list[Launch]:
    """The launches the dry run prints, in order."""
    done = subprocess.run(["bash", str(SCRIPT)], env=_env(fake_bin, generators, learners, STREAM_RL_DRY_RUN="1",
                                                          **extra),
                          cwd=fake_bin.parent, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert not (fake_bin.parent / "run").exists(), "a dry run must not create the run directory"
    return [_parse(line) for line in done.stdout.splitlines()]


def _host(addr: str) -> str:
    return split_address(addr)[1]


def check_wiring(launches: list[Launch], gen_nodes: list[str], learner_nodes: list[str], out: Path,
                 per_node: int = 1, tp: int = 8) -> dict[str, list[Launch]]:
    by_role = {r: [x for x in launches if x.role == r] for r in ("generator", "learner", "controller")}
    gens, learners, (controller,) = by_role["generator"], by_role["learner"], by_role["controller"]
    cfgs = [x.cfg for x in launches]
    cfg = cfgs[0]
    # One config for every role: each one's addresses are the others' too.
    assert all(config_to_dict(c) == config_to_dict(cfg) for c in cfgs)
    assert cfg.run.id == f"stream-rl-{JOB_ID}"

    hosts = [n for n in gen_nodes for _ in range(per_node)]
    assert cfg.generator.hosts == hosts
    assert cfg.generator.count == len(hosts)
    assert cfg.generator.tensor_parallel_size == tp
    assert sorted(g.args.index for g in gens) == list(range(len(hosts)))
    for g in gens:
        assert g.host == g.srun.nodelist == hosts[g.args.index]
        assert g.srun.het_group == 0 and g.srun.nodes == g.srun.ntasks == 1
        assert g.srun.gres == f"gpu:{tp}"
        assert {_host(a) for a in generator_addrs(cfg.generator, g.args.index)} == {g.host}

    # One torchrun agent per learner node; global rank 0 is on the node
    # torch's c10d rendezvous ranks first, and it binds learner.addr and
    # hosts the weight-sync store.
    assert [x.host for x in learners] == learner_nodes
    ranked = sorted(_NodeDesc(x.torchrun.local_addr, 0, 0) for x in learners)
    head = ranked[0].addr
    assert _host(cfg.learner.addr) == head
    assert cfg.weights_sync.host == head
    for x in learners:
        t = x.torchrun
        assert x.host == x.srun.nodelist == t.local_addr
        assert x.srun.het_group == 1 and x.srun.nodes == x.srun.ntasks == 1
        assert x.srun.gres == f"gpu:{t.nproc_per_node}"
        assert (t.nnodes, t.nproc_per_node) == (str(len(learner_nodes)), "8")
        assert (t.rdzv_backend, t.rdzv_endpoint, t.rdzv_id) == ("c10d", f"{head}:29400", JOB_ID)

    assert controller.host == controller.srun.nodelist == head
    assert _host(cfg.learner.reply_addr) == controller.host
    assert controller.srun.het_group == 1 and controller.srun.overlap and controller.srun.gres == "none"

    for x in launches:
        assert Path(x.srun.output).parent == out / "logs"
    assert [x.args.out for x in learners + [controller]] == [str(out)] * (len(learners) + 1)
    assert len({x.srun.output for x in launches}) == len(launches), "each role logs to a file of its own"
    return by_role


def test_three_nodes_one_generator_per_node(fake_bin: Path) -> None:
    launches = render(fake_bin, "gpu[01-02]", "train01")
    assert [x.role for x in launches] == ["generator", "generator", "learner", "controller"]
    roles = check_wiring(launches, ["gpu01", "gpu02"], ["train01"], fake_bin.parent / "run")
    (learner,), (controller,) = roles["learner"], roles["controller"]
    assert learner.args.resume is None and controller.args.resume is False
    assert _host(controller.cfg.learner.addr) == "train01"


def test_two_learner_nodes_two_generators_per_node(fake_bin: Path) -> None:
    # train10 sorts before train9: it, not Slurm's first node, gets rank 0.
    launches = render(fake_bin, "gpu01,gpu02", "train[9-10]", GENERATORS_PER_NODE="2", TENSOR_PARALLEL="4")
    roles = check_wiring(launches, ["gpu01", "gpu02"], ["train9", "train10"], fake_bin.parent / "run",
                         per_node=2, tp=4)
    assert roles["controller"][0].host == "train10"
    assert {g.srun.cpus_per_task for g in roles["generator"]} == {32}


def test_resume_adds_the_flags(fake_bin: Path) -> None:
    out = fake_bin.parent / "run"
    roles = check_wiring(render(fake_bin, "gpu[01-02]", "train01", RESUME="1"), ["gpu01", "gpu02"], ["train01"],
                         out)
    assert roles["learner"][0].args.resume == str(out / "checkpoint")
    assert roles["controller"][0].args.resume is True
    assert all(not hasattr(g.args, "resume") for g in roles["generator"])


def test_config_is_relative_to_the_submit_dir(fake_bin: Path) -> None:
    launches = render(fake_bin, "gpu01", "train01")
    assert {x.args.config for x in launches} == {str(REPO / "configs" / "tiny.yaml")}


# --- outside a dry run: fake srun and roles ----------------------------------

# srun: runs the command here, its output in --output, after noting its pid
# (which the command keeps) for the test to check nothing outlives the job.
FAKE_SRUN = r'''#!/bin/bash
out=/dev/null
while [[ $1 == -* ]]; do
    case $1 in --output=*) out=${1#--output=} ;; -w) shift ;; esac
    shift
done
echo $$ >> "$FAKE_PIDS"
exec "$@" >> "$out" 2>&1
'''
# A role: the one FAKE_FAILING names ("generator1", "learner") fails at once,
# the controller finishes after FAKE_CONTROLLER_S with FAKE_CONTROLLER_RC,
# the others run until stopped.
FAKE_ROLE = r'''#!/bin/bash
role=$1 index=
[[ $(basename "$0") == torchrun ]] && role=learner
prev=
for word; do [[ $prev == --index ]] && index=$word; prev=$word; done
if [[ $role$index == "${FAKE_FAILING:-}" ]]; then sleep 0.2; exit 3; fi
if [[ $role == controller ]]; then sleep "$FAKE_CONTROLLER_S"; exit "$FAKE_CONTROLLER_RC"; fi
exec sleep 30
'''


def run_job(fake_bin: Path, **extra: str) -> tuple[subprocess.CompletedProcess, float]:
    for name, text in (("srun", FAKE_SRUN), ("stream-rl", FAKE_ROLE), ("torchrun", FAKE_ROLE)):
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    pids = fake_bin.parent / "pids"
    env = _env(fake_bin, "gpu[01-02]", "train01", **{"POLL_S": "0.1", "GRACE_S": "1", "FAKE_PIDS": str(pids),
                                                     "FAKE_CONTROLLER_S": "20", "FAKE_CONTROLLER_RC": "0", **extra})
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=fake_bin.parent, capture_output=True, text=True,
                          timeout=30)
    took = time.monotonic() - t0
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 4  # 2 generators, 1 learner, the controller
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # no role outlives the job
    return done, took


def test_a_failed_role_stops_the_job_and_is_named(fake_bin: Path) -> None:
    done, took = run_job(fake_bin, FAKE_FAILING="generator1")
    assert done.returncode == 1, done.stderr
    assert "error: generator 1 on gpu02 failed (status 3)" in done.stderr
    assert took < 10, "the job stops at once, not with the controller"


def test_a_failed_learner_is_named(fake_bin: Path) -> None:
    done, _ = run_job(fake_bin, FAKE_FAILING="learner")
    assert done.returncode == 1 and "error: learner on train01 failed (status 3)" in done.stderr


@pytest.mark.parametrize("controller_rc", ["0", "2"])
def test_the_job_ends_with_the_controller(fake_bin: Path, controller_rc: str) -> None:
    done, _ = run_job(fake_bin, FAKE_CONTROLLER_S="0.5", FAKE_CONTROLLER_RC=controller_rc)
    assert done.returncode == int(controller_rc), done.stderr
    assert f"controller exited with status {controller_rc}" in done.stdout
    # The fake roles ignore the controller's end: stopped after GRACE_S.
    assert "stopping generator 0 on gpu01: still running 1s after the controller" in done.stdout
    assert (fake_bin.parent / "run" / "logs" / f"{JOB_ID}-controller-train01.log").is_file()
