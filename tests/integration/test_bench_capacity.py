"""The engine's capacity (`benchmarks/capacity.py`): the pure parts, and the raw
engine placed as the pipeline's, saturated in a child process."""

from __future__ import annotations

import time

import msgspec
import pytest

from benchmarks.capacity import CapacityProbe, pipeline_concurrency


def _gen(cfg, **changes):
    return msgspec.structs.replace(cfg, generator=msgspec.structs.replace(cfg.generator, **changes))


def test_pipeline_concurrency_is_every_open_member_up_to_max_num_seqs(engine_cfg):
    assert pipeline_concurrency(_gen(engine_cfg, target_groups=16, group_size=8, overprovision=1.0)) == 128
    assert pipeline_concurrency(_gen(engine_cfg, target_groups=16, group_size=8, overprovision=1.5)) == 192
    assert pipeline_concurrency(_gen(engine_cfg, target_groups=64, group_size=8, overprovision=2.0,
                                     max_num_seqs=256)) == 256


@pytest.mark.engine
def test_the_raw_engine_is_idle_between_measures_and_batching_pays(engine_cfg):
    cfg = _gen(engine_cfg, max_num_seqs=64)
    with CapacityProbe(cfg) as probe:
        # Idle between systems: the engine must not take the CPU they measure on.
        c0, t0 = probe.cpu_s(), time.perf_counter()
        time.sleep(3.0)
        idle = (probe.cpu_s() - c0) / (time.perf_counter() - t0)
        assert idle < 0.15, f"the idle capacity engine used {idle:.2f} cores"
        small = probe.measure(32, concurrency=4, seconds=3.0, warmup_s=1.0)
        big = probe.measure(32, concurrency=64, seconds=3.0, warmup_s=1.0)
    for m in (small, big):
        assert m["requests_finished"] > 0 and m["tokens_per_request"] == 32
    assert (small["concurrency"], big["concurrency"]) == (4, 64)
    # Per decode step ~1.5 ms + 0.035 ms x batch here: 64 in flight give
    # several times the tokens/s of 4.
    assert big["engine_capacity_tokens_per_s"] > 2.0 * small["engine_capacity_tokens_per_s"] > 0


