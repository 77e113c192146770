"""`stream-rl train` with `launch: ray`: the roles as actors on a running
Ray cluster, this process (the driver) as the controller.

Generators get one placement-group bundle each (their engine's GPUs, or
CPUs for CPU engines), learner nodes one each (their ranks' GPUs), with the
custom resources `ray.*_resources` names. Each bundle holds a `RoleHost`
actor that starts the role's usual command on its node: the learner's
ranks run under torchrun inside the actors, so a multi-node learner is the
same torch.distributed job as by hand or under SLURM (docs/cluster.md says
why not Ray Train). Addresses come from where the actors landed; logs go
to OUT/logs on the shared filesystem the checkpoints already need.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

import msgspec

import stream_rl
from stream_rl.cluster.plan import Addresses, bundles, generator_command, learner_command, resolved
from stream_rl.config import Config, generator_addrs, split_address
from stream_rl.config.checks import check
from stream_rl.controller.launch import GENERATOR_STOP_S, make_pool, run_controller, tell_roles_to_exit
from stream_rl.generator.client import GeneratorClient, GeneratorError
from stream_rl.learner.checkpoint import find_checkpoint
from stream_rl.learner.client import LearnerClient, LearnerError
from stream_rl.preflight import check_job
from stream_rl.protocol import Hello
from stream_rl.transport import free_ports

log = logging.getLogger(__name__)

LEARNER_STOP_S = 60.0  # it saves its final model first
PORTS_FREED_S = 30.0


class RayError(RuntimeError):
    """The cluster cannot run the job as configured (no room, no shared
    run directory, no free ports)."""


def where(node: dict) -> str:
    return f"{node['ip']} ({node['hostname']}, Ray node {node['node_id'][:12]})"


def _cause(ref, what: str) -> str | None:
    """What a RoleHost.watch call says, once it has: the process's end, or
    the actor's own death (its node lost, killed)."""
    import ray

    if not ray.wait([ref], timeout=0)[0]:
        return None
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as err:
        return f"{what}: its Ray actor died ({type(err).__name__}: {str(err).splitlines()[0][:300]})"


class RayGenerator(GeneratorClient):
    """A generator whose process a RoleHost actor holds."""

    def __init__(self, cfg: Config, index: int, host, pid: int, node: dict):
        super().__init__(cfg, index)
        self.host, self.node = host, node
        self._watch = host.watch.remote(pid)
        self._cause: str | None = None

    def exit_cause(self) -> str | None:
        if self._cause is None:
            self._cause = _cause(self._watch, f"generator {self.index} on node {where(self.node)}")
        return self._cause

    def kill(self) -> None:
        import ray

        try:
            ray.get(self.host.stop.remote(0.0), timeout=30)
        except ray.exceptions.RayError:
            pass  # its actor is gone, and with it the process (parent-death signal)


class RayLearner(LearnerClient):
    """The learner, its nodes' processes held by RoleHost actors."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._watches: list = []

    def watch(self, hosts_pids_nodes: list) -> None:
        self._watches = [(h.watch.remote(pid), f"learner node {k} on node {where(node)}")
                         for k, (h, pid, node) in enumerate(hosts_pids_nodes)]

    def check_alive(self) -> None:
        for ref, what in self._watches:
            cause = _cause(ref, what)
            if cause:
                raise LearnerError(cause)


class RayJob:
    """The actors and placement groups of one job, and how they are stopped."""

    def __init__(self, cfg: Config, out: Path):
        import ray
        from ray.util.placement_group import placement_group

        self.cfg, self.out = cfg, out
        self.timings: dict[str, float] = {}
        t = time.monotonic()
        try:
            ray.init(address=cfg.ray.address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, TimeoutError) as err:  # Ray's ways of saying "nobody there"
            raise RayError(f"no Ray cluster at ray.address={cfg.ray.address!r} ({err}): start one with "
                           "`ray start --head`, or set ray.address to its head's HOST:PORT") from None
        self.timings["ray_init_s"] = time.monotonic() - t
        self.plan = bundles(cfg, ray.cluster_resources().get("GPU", 0.0))
        t = time.monotonic()
        self.gen_pg = placement_group(self.plan.generators, strategy=cfg.ray.generator_strategy)
        # A learner's nodes are distinct machines: two of its "nodes" on one would share its GPUs' links.
        self.learner_pg = placement_group(self.plan.learner,
                                          strategy="STRICT_SPREAD" if len(self.plan.learner) > 1 else "PACK")
        self._wait_placed()
        self.timings["placement_s"] = time.monotonic() - t
        self.gens = [self._actor(self.gen_pg, i, self.plan.generators[i], f"generator {i}")
                     for i in range(cfg.generator.count)]
        self.learners = [self._actor(self.learner_pg, k, self.plan.learner[k], f"learner node {k}")
                         for k in range(len(self.plan.learner))]
        self.gen_nodes = ray.get([a.node.remote() for a in self.gens])
        self.learner_nodes = ray.get([a.node.remote() for a in self.learners])
        self._check_shared_out()

    def _wait_placed(self) -> None:
        import ray

        timeout = self.cfg.ray.placement_timeout_s
        ready, _ = ray.wait([self.gen_pg.ready(), self.learner_pg.ready()], num_returns=2, timeout=timeout)
        if len(ready) < 2:
            raise RayError(
                f"the Ray cluster found no room within ray.placement_timeout_s ({timeout:g} s) for "
                f"{len(self.plan.generators)} generator(s) of {self.plan.generators[0]} and "
                f"{len(self.plan.learner)} learner node(s) of {self.plan.learner[0]}; it has "
                f"{ray.available_resources()} free of {ray.cluster_resources()} (ray.generator_resources, "
                f"ray.learner_resources, ray.generator_cpus, ray.learner_cpus, ray.generator_gpus)")

    def _actor(self, pg, index: int, bundle: dict[str, float], role: str):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from stream_rl.cluster.role_host import RoleHost

        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        # Threads: watch() stays open all job long beside start/stop calls.
        return ray.remote(RoleHost).options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), resources=custom, max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
        ).remote(role)

    def _check_shared_out(self) -> None:
        import ray

        probe = self.out / f".shared-{secrets.token_hex(4)}"
        probe.write_text("stream_rl")
        try:
            hosts = self.gens + self.learners
            seen = ray.get([h.sees.remote(str(probe)) for h in hosts])
        finally:
            probe.unlink()
        blind = [n["hostname"] for n, ok in zip(self.gen_nodes + self.learner_nodes, seen) if not ok]
        if blind:
            raise RayError(f"the run directory {self.out} is not visible from node(s) {sorted(set(blind))}: with "
                           "launch: ray it must be on a filesystem every node shares (checkpoints, logs)")

    def addresses(self) -> Addresses:
        """Where each role listens: generator ports at one base on every
        generator's node (checked free there), the learner's on its first node."""
        import ray

        ips = [n["ip"] for n in self.gen_nodes]
        for _ in range(20):
            base = free_ports(2 * self.cfg.generator.count, consecutive=True)[0]
            taken = ray.get([h.taken.remote([base + 2 * i, base + 2 * i + 1]) for i, h in enumerate(self.gens)])
            if not any(taken):
                break
        else:
            raise RayError("no generator ports were free on the generators' nodes after 20 tries")
        learner_port, self.master_port = ray.get(self.learners[0].free_ports.remote(2))
        return Addresses(ips, base, self.learner_nodes[0]["ip"], learner_port, ray.util.get_node_ip_address(),
                         free_ports(1)[0])

    def role_env(self) -> tuple[str, dict[str, str]]:
        """The roles' working directory and environment: this one's, and
        this stream_rl first on the path (a checkout on the shared
        filesystem runs the same code everywhere)."""
        src = str(Path(stream_rl.__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
        env = {"PYTHONPATH": path}
        if os.environ.get("STREAM_RL_SECRET"):
            env["STREAM_RL_SECRET"] = os.environ["STREAM_RL_SECRET"]
        return os.getcwd(), env

    def generator_host(self, i: int) -> tuple[object, dict]:
        """Generator i's actor and node; a new actor in its bundle if the
        old one died (Ray places a lost node's bundles again)."""
        import ray

        try:
            ray.get(self.gens[i].node.remote(), timeout=60)
        except ray.exceptions.RayError as err:
            log.warning("generator %d: its actor is gone (%s); placing a new one", i, type(err).__name__)
            ray.kill(self.gens[i])
            self.gens[i] = self._actor(self.gen_pg, i, self.plan.generators[i], f"generator {i}")
            self.gen_nodes[i] = ray.get(self.gens[i].node.remote(), timeout=self.cfg.ray.placement_timeout_s)
            (self.out / "placement.json").write_text(json.dumps(self.placement(), indent=2))
        return self.gens[i], self.gen_nodes[i]

    def placement(self) -> list[dict]:
        rows = [{"role": "generator", "index": i, **n, "bundle": self.plan.generators[i]}
                for i, n in enumerate(self.gen_nodes)]
        rows += [{"role": "learner", "node_rank": k, **n, "bundle": self.plan.learner[k]}
                 for k, n in enumerate(self.learner_nodes)]
        return rows

    def stop(self, learner_timeout_s: float = LEARNER_STOP_S) -> None:
        """Every role's process: waited for (they were told to exit), then
        killed; then the actors and their placement groups."""
        import ray
        from ray.util.placement_group import remove_placement_group

        stops = [h.stop.remote(learner_timeout_s) for h in self.learners]
        stops += [h.stop.remote(GENERATOR_STOP_S) for h in self.gens]
        try:
            ray.get(stops, timeout=learner_timeout_s + 30)
        except ray.exceptions.RayError as err:
            log.warning("stopping the roles: %s", str(err).splitlines()[0])
        for h in self.gens + self.learners:
            ray.kill(h)
        for pg in (self.gen_pg, self.learner_pg):
            remove_placement_group(pg)


def train_on_ray(cfg: Config, out_dir: str | Path | None = None, max_steps: int | None = None,
                 resume: bool = False) -> dict:
    try:
        import ray
    except ImportError:
        raise RayError("launch: ray needs Ray on this host and every node: pip install 'stream-rl[ray]'") from None
    t_start = time.time()
    checked = check_job(cfg)  # before anything is placed: errors in seconds
    if not cfg.run.id:
        cfg = msgspec.structs.replace(cfg, run=msgspec.structs.replace(cfg.run, id=secrets.token_hex(4)))
    out = Path(out_dir or cfg.run.out_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ckpt = find_checkpoint(out / "checkpoint") if resume else None
    job = learner = None
    gens: list[GeneratorClient] = []
    pool = None
    try:
        job = RayJob(cfg, out)
        cwd, env = job.role_env()
        rcfg = resolved(cfg, job.addresses(), Path(cwd), out)
        check(rcfg)
        (out / "placement.json").write_text(json.dumps(job.placement(), indent=2))
        for n in job.placement():
            log.info("%s %s on node %s (%s)", n["role"], n.get("index", n.get("node_rank")), n["ip"], n["hostname"])
        cfg_path = out / "ray_job_config.json"
        cfg_path.write_bytes(msgspec.json.encode(rcfg))
        learner = RayLearner(rcfg)  # binds the reply address before the learner connects
        t = time.monotonic()
        master = (job.learner_nodes[0]["ip"], job.master_port)
        pids = ray.get([h.start.remote(learner_command(cfg_path, out, len(job.learners), k, job.plan.ranks_per_node,
                                                       master, ckpt), str(out / "logs" / f"learner-node{k}.log"),
                                       cwd, env) for k, h in enumerate(job.learners)])
        learner.watch(list(zip(job.learners, pids, job.learner_nodes)))

        def start(i: int) -> GeneratorClient:
            """Generator i's process, first or again after a loss (on another
            node if its own was lost: its address changes with it)."""
            host, node = job.generator_host(i)
            gcfg, path = rcfg, cfg_path
            if node["ip"] != rcfg.generator.hosts[i]:
                hosts = [node["ip"] if j == i else h for j, h in enumerate(rcfg.generator.hosts)]
                gcfg = msgspec.structs.replace(rcfg, generator=msgspec.structs.replace(rcfg.generator, hosts=hosts))
                path = out / f"ray_job_config-generator{i}.json"
                path.write_bytes(msgspec.json.encode(gcfg))
            # A process its dead actor left is still closing its sockets.
            ports = [int(split_address(a)[2]) for a in generator_addrs(gcfg.generator, i)]
            deadline = time.monotonic() + PORTS_FREED_S
            while ray.get(host.taken.remote(ports)):
                if time.monotonic() > deadline:
                    raise RayError(f"generator {i}'s ports {ports} stayed taken on node {where(node)}")
                time.sleep(0.5)
            pid = ray.get(host.start.remote(generator_command(path, i), str(out / "logs" / f"generator-{i}.log"),
                                            cwd, env))
            client = RayGenerator(gcfg, i, host, pid, node)
            client.requests.send(Hello())
            return client

        gens = [start(i) for i in range(cfg.generator.count)]
        for g in gens:
            g.wait_ready(cfg.generator.startup_timeout_s)
        ready = learner.wait_ready(cfg.learner.startup_timeout_s)
        job.timings["roles_ready_s"] = time.monotonic() - t
        pool = make_pool(rcfg, gens, start)
        summary = run_controller(rcfg, out, pool, learner, ready, max_steps, t_start, fresh_generators=True,
                                 resume_from=ckpt, checked=checked)
        summary["launch"] = {"launcher": "ray", **job.timings}
        summary["placement"] = job.placement()
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        if learner is not None:
            tell_roles_to_exit(learner, pool.clients if pool is not None else gens)
        if job is not None:
            job.stop()
        ray.shutdown()


__all__ = ["RayError", "train_on_ray", "GeneratorError", "LearnerError"]
