"""Which cores the roles of a one-host job run on (stream_rl.placement)."""

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stream_rl.config import ConfigError, load_config
from stream_rl.placement import PlacementError, format_cores, parse_cores, pin, plan, split
from stream_rl.roles import start_role


def test_generators_on_one_host_get_their_own_cores():
    assert [split([0, 1], i, 2) for i in range(2)] == [[0], [1]]
    assert [split([0, 1, 2, 3, 4], i, 2) for i in range(2)] == [[0, 1, 2], [3, 4]]
    assert [split([4, 5], i, 3) for i in range(3)] == [[4], [5], [4]]  # more engines than cores


def test_auto_gives_the_engine_all_cores_but_one():
    p = plan("auto", 1, [0, 1])
    assert p.engines == [[0]] and p.rest == [1]
    p = plan("auto", 2, [3, 0, 1, 2])
    assert p.engines == [[0, 1], [2]]
    assert p.rest == [3]
    # GPU engines, or too few cores to give every engine one: the kernel decides.
    assert plan("auto", 1, [0, 1], cpu_engine=False) is None
    assert plan("auto", 1, [0]) is None
    assert plan("auto", 2, [0, 1]) is None
    assert plan(None, 1, [0, 1]) is None


def test_an_explicit_list_is_split_among_the_generators():
    p = plan([2, 3, 0], 2, [0, 1, 2, 3])
    assert p.engines == [[0, 2], [3]] and p.rest == [1]
    with pytest.raises(PlacementError, match=r"\[5\] are not among"):
        plan([0, 5], 1, [0, 1])
    with pytest.raises(PlacementError, match="no core"):
        plan([0, 1], 1, [0, 1])
    with pytest.raises(PlacementError, match="each engine needs one"):
        plan([0], 2, [0, 1, 2])


@given(st.sets(st.integers(0, 63), min_size=2, max_size=16), st.integers(1, 4))
def test_auto_never_shares_a_core_between_engines_and_the_rest(cores, count):
    p = plan("auto", count, sorted(cores))
    if p is None:
        assert len(cores) < count + 1
        return
    engine = {c for e in p.engines for c in e}
    assert p.rest and engine and not engine & set(p.rest)
    assert engine | set(p.rest) == cores
    assert all(e for e in p.engines)


@given(st.lists(st.integers(0, 200), min_size=1, max_size=12))
def test_core_lists_round_trip(cores):
    assert parse_cores(format_cores(cores)) == sorted(set(cores))


def test_core_lists_in_taskset_form():
    assert parse_cores("0,2-4, 7") == [0, 2, 3, 4, 7]
    for bad in ("", "a", "1-", "-2", "1,,2"):
        with pytest.raises(PlacementError, match="not a core list"):
            parse_cores(bad)


def test_config_names_the_field(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["generator.engine_cpus=[0, 1]"])
    assert cfg.generator.engine_cpus == [0, 1]
    with pytest.raises(ConfigError, match="generator.engine_cpus"):
        load_config("configs/tiny.yaml", ["generator.engine_cpus=[]"])
    with pytest.raises(ConfigError, match="generator.engine_cpus"):
        load_config("configs/tiny.yaml", ["generator.engine_cpus=many"])
    with pytest.raises(ConfigError, match="generator.engine_cpus"):
        load_config("configs/tiny.yaml", ["generator.engine_cpus=[0]", "generator.hosts=[g0]"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_pin_moves_every_thread_and_a_role_starts_on_its_cores(tmp_path):
    import threading

    before = sorted(os.sched_getaffinity(0))
    started = threading.Event()
    stop = threading.Event()

    def idle():
        started.set()
        stop.wait()

    t = threading.Thread(target=idle)
    t.start()
    started.wait()
    try:
        pin(before[:1])
        for tid in os.listdir("/proc/self/task"):
            assert os.sched_getaffinity(int(tid)) == {before[0]}
    finally:
        pin(before)
        stop.set()
        t.join()
    assert sorted(os.sched_getaffinity(0)) == before
    proc, log = start_role(["-c", "import os; print(sorted(os.sched_getaffinity(0)))"], tmp_path / "role.log",
                           cpus=before[-1:])
    proc.wait(30)
    log.close()
    assert (tmp_path / "role.log").read_text().strip() == str(before[-1:])


def test_generator_command_refuses_a_bad_core_list():
    r = subprocess.run([sys.executable, "-m", "stream_rl", "generator", "--config", "configs/tiny.yaml",
                        "--engine-cpus", "0-"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a core list" in r.stderr
