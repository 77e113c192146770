"""What a cluster launcher asks of the cluster and tells the roles."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_rl.cluster.plan import Addresses, bundles, generator_command, learner_command, resolved
from stream_rl.config import ConfigError, config_from_dict, generator_addrs
from stream_rl.config.checks import check


def _cfg(**sections):
    return config_from_dict({k: dict(v) for k, v in sections.items()})


def test_cpu_cluster_gives_cpu_engines_and_custom_resources():
    cfg = _cfg(generator={"count": 3, "tensor_parallel_size": 2},
               ray={"generator_resources": {"infer": 1}, "generator_cpus": 4, "learner_cpus": 2})
    b = bundles(cfg, cluster_gpus=0)
    assert b.generators == [{"CPU": 4.0, "infer": 1.0}] * 3
    assert b.learner == [{"CPU": 2.0}] and b.ranks_per_node == 1


def test_gpu_cluster_gives_each_engine_its_tensor_parallel_gpus_and_each_rank_one():
    cfg = _cfg(generator={"count": 2, "tensor_parallel_size": 4}, learner={"device": "cuda", "ranks": 8},
               ray={"learner_nodes": 2, "learner_resources": {"train": 1}})
    b = bundles(cfg, cluster_gpus=16)
    assert [g["GPU"] for g in b.generators] == [4.0, 4.0]
    assert b.learner == [{"CPU": 4.0, "GPU": 4.0, "train": 1.0}] * 2 and b.ranks_per_node == 4
    assert "GPU" not in bundles(_cfg(ray={"generator_gpus": 0}), cluster_gpus=8).generators[0]


def test_learner_ranks_must_split_over_its_nodes():
    with pytest.raises(ConfigError, match="ray.learner_nodes"):
        _cfg(learner={"ranks": 3}, ray={"learner_nodes": 2})


def test_resolved_config_puts_every_role_where_it_landed(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    cfg = _cfg(generator={"count": 3, "engine_cpus": "auto"}, model={"path": "Org/Some-Model"},
               data={"path": "data/train.jsonl"})
    at = Addresses(["10.0.0.1", "10.0.0.1", "10.0.0.2"], 41000, "10.0.0.9", 42000, "10.0.0.5", 43000)
    r = resolved(cfg, at, tmp_path, tmp_path / "out")
    check(r)
    assert [generator_addrs(r.generator, i) for i in range(3)] == [
        ("tcp://10.0.0.1:41000", "tcp://10.0.0.1:41001"), ("tcp://10.0.0.1:41002", "tcp://10.0.0.1:41003"),
        ("tcp://10.0.0.2:41004", "tcp://10.0.0.2:41005")]
    assert r.learner.addr == "tcp://10.0.0.9:42000" and r.weights_sync.host == "10.0.0.9"
    assert r.learner.reply_addr == "tcp://10.0.0.5:43000"
    assert r.generator.engine_cpus is None  # core placement is a local launch's
    assert r.data.path == str(tmp_path / "data" / "train.jsonl")  # the roles run elsewhere
    assert r.model.path == "Org/Some-Model"  # a hub name is no path
    assert r.run.out_dir == str(tmp_path / "out")
    with pytest.raises(ConfigError):
        resolved(cfg, Addresses(["10.0.0.1"], 41000, "h", 1, "c", 2), tmp_path, tmp_path)


def test_learner_command_is_the_role_alone_or_torchrun_with_a_static_rendezvous():
    from torch.distributed.run import get_args_parser


    one = learner_command(Path("c.json"), Path("/o"), 1, 0, 1, ("10.0.0.9", 29500))
    assert one == ["-m", "stream_rl", "learner", "--config", "c.json", "--out", "/o"]
    cmd = learner_command(Path("c.json"), Path("/o"), 2, 1, 4, ("10.0.0.9", 29500), resume=Path("/o/checkpoint"))
    assert cmd[:2] == ["-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(cmd[2:])
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "4")
    assert (args.master_addr, args.master_port) == ("10.0.0.9", 29500)
    assert args.module and args.training_script == "stream_rl"
    assert args.training_script_args == ["learner", "--config", "c.json", "--out", "/o", "--resume", "/o/checkpoint"]
    assert generator_command(Path("c.json"), 2) == ["-m", "stream_rl", "generator", "--config", "c.json",
                                                    "--index", "2"]
