"""The `ray` section: where `launch: ray` places the roles (docs/cluster.md)."""

from __future__ import annotations

from typing import Literal

from stream_rl.config.base import NonNegInt, PosFloat, PosInt, _Section


class RayConfig(_Section):
    """`launch: ray` (docs/cluster.md): the roles as actors on a Ray cluster
    that `ray start` made; every address is found through Ray."""
    # ray.init's address: "auto" (the cluster `ray start` made on this host)
    # or the head's HOST:PORT.
    address: str = "auto"
    # Custom resources each generator, and each learner node, asks of its
    # Ray node: `ray start --resources '{"infer": 8}'` on the engines' nodes
    # with {"infer": 1} here keeps the engines there.
    generator_resources: dict[str, PosFloat] = {}
    learner_resources: dict[str, PosFloat] = {}
    # CPUs Ray reserves per generator and per learner rank: a scheduling
    # count, nothing is pinned.
    generator_cpus: PosFloat = 1.0
    learner_cpus: PosFloat = 1.0
    # GPUs per engine. "auto": generator.tensor_parallel_size when the
    # cluster has GPUs, none (CPU engines) when it has not.
    generator_gpus: NonNegInt | Literal["auto"] = "auto"
    # Nodes the learner's ranks span (learner.ranks split evenly; torchrun
    # runs each node's share). Ranks of one node share its fast links.
    learner_nodes: PosInt = 1
    # PACK fills a node with engines before the next; SPREAD puts them on
    # as many nodes as it can (Ray's placement-group strategies).
    generator_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # How long the cluster may take to find room for every role before the
    # job stops, naming what it asked for and what the cluster has.
    placement_timeout_s: PosFloat = 300.0
