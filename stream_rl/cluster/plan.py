"""What a cluster launcher asks for and what it tells the roles, as pure
functions: the resources of each role's placement-group bundle, the role
commands, and the job's config with every address filled in from where the
roles landed. Ray's side (`ray_job.py`, `role_host.py`) only carries them out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec

from stream_rl.config import Config, ConfigError


@dataclass(frozen=True)
class Bundles:
    generators: list[dict[str, float]]  # one per generator (its engine)
    learner: list[dict[str, float]]  # one per learner node (its ranks)
    ranks_per_node: int


def bundles(cfg: Config, cluster_gpus: float) -> Bundles:
    """Each generator's and each learner node's resources. GPU engines take
    `tensor_parallel_size` GPUs each (ray.generator_gpus: "auto") when the
    cluster has GPUs; a CUDA learner takes one GPU per rank."""
    r, g, lc = cfg.ray, cfg.generator, cfg.learner
    gpus = (g.tensor_parallel_size if cluster_gpus > 0 else 0) if r.generator_gpus == "auto" else r.generator_gpus
    gen = {"CPU": r.generator_cpus, **({"GPU": float(gpus)} if gpus else {}), **r.generator_resources}
    per_node = lc.ranks // r.learner_nodes
    learner = {"CPU": r.learner_cpus * per_node, **r.learner_resources}
    if lc.device.startswith("cuda"):
        learner["GPU"] = float(per_node)
    return Bundles([dict(gen) for _ in range(g.count)], [dict(learner) for _ in range(r.learner_nodes)], per_node)


@dataclass(frozen=True)
class Addresses:
    generator_hosts: list[str]  # generator i's node address
    generator_base_port: int  # generator i listens on base + 2i (requests) and base + 2i + 1 (stream)
    learner_host: str  # the learner's first node: rank 0, the weight-sync store
    learner_port: int
    controller_host: str  # this process, the driver
    reply_port: int


def resolved(cfg: Config, at: Addresses, cwd: Path, out: Path) -> Config:
    """The job's config as the roles get it: every address where its role
    landed, paths made absolute (the roles run in other directories, on
    other nodes), and what only a local launch means (core placement) off."""
    g, lc = cfg.generator, cfg.learner
    base = at.generator_base_port
    if len(at.generator_hosts) != g.count:
        raise ConfigError(f"{len(at.generator_hosts)} generator hosts for generator.count={g.count}")
    gen = msgspec.structs.replace(
        g, hosts=list(at.generator_hosts), request_addr=f"tcp://{at.generator_hosts[0]}:{base}",
        stream_addr=f"tcp://{at.generator_hosts[0]}:{base + 1}",
        # engine_cpus splits the cores of the host `stream-rl train` runs on.
        engine_cpus=None)
    learner = msgspec.structs.replace(lc, addr=f"tcp://{at.learner_host}:{at.learner_port}",
                                      reply_addr=f"tcp://{at.controller_host}:{at.reply_port}")
    ws = msgspec.structs.replace(cfg.weights_sync, host=at.learner_host)
    model = msgspec.structs.replace(cfg.model, path=_absolute(cfg.model.path, cwd))
    data = msgspec.structs.replace(cfg.data, path=_absolute(cfg.data.path, cwd))
    run = msgspec.structs.replace(cfg.run, out_dir=str(out))
    return msgspec.structs.replace(cfg, generator=gen, learner=learner, weights_sync=ws, model=model, data=data,
                                   run=run)


def _absolute(path: str, cwd: Path) -> str:
    """A relative path that names something here, made absolute; anything
    else (a hub name such as Qwen/Qwen3-1.7B) as it is."""
    p = Path(path)
    return str(cwd / p) if not p.is_absolute() and (cwd / p).exists() else path


def generator_command(cfg_path: Path, index: int) -> list[str]:
    return ["-m", "stream_rl", "generator", "--config", str(cfg_path), "--index", str(index)]


def learner_command(cfg_path: Path, out: Path, nodes: int, node_rank: int, ranks_per_node: int,
                    master: tuple[str, int], resume: Path | None = None) -> list[str]:
    """One learner node's command: the role itself for a single rank, else
    torchrun for this node's ranks with a static rendezvous at `master`
    (rank 0's node)."""
    cmd = ["-m", "stream_rl", "learner", "--config", str(cfg_path), "--out", str(out)]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if nodes * ranks_per_node == 1:
        return cmd
    return ["-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node_rank),
            "--nproc_per_node", str(ranks_per_node), "--master_addr", master[0], "--master_port", str(master[1]),
            *cmd]
