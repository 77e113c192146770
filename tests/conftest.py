"""Shared fixtures: the tiny world (built once, cached) and one generator
process with the real vLLM engine for the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_DIR = Path(os.environ.get("STREAM_RL_TINY", ROOT / ".cache" / "tiny"))


def free_port() -> int:
    # Outside the kernel's ephemeral range, as the jobs pick theirs: the
    # session's ports are picked at its start and bound minutes later, and
    # an ephemeral port can meanwhile go to one of the engine's own sockets
    # (a test session failed with "Address already in use" on an ephemeral
    # port, 39981).
    from stream_rl.transport import free_ports

    return free_ports(1)[0]


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one intra-op thread for a module's tests, restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_world() -> dict:
    from stream_rl.tiny.prepare import prepare_tiny

    stats = prepare_tiny(TINY_DIR)
    return {"dir": TINY_DIR, "stats": stats}


@pytest.fixture(scope="session")
def engine_cfg(tiny_world):
    from stream_rl.config import load_config

    d = tiny_world["dir"]
    return load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.path={d / 'model'}",
        f"data.path={d / 'data' / 'train.jsonl'}",
        f"generator.request_addr=tcp://127.0.0.1:{free_port()}",
        f"generator.stream_addr=tcp://127.0.0.1:{free_port()}",
        f"learner.addr=tcp://127.0.0.1:{free_port()}",
        f"learner.reply_addr=tcp://127.0.0.1:{free_port()}",
        "run.progress=false",
    ])


@pytest.fixture(scope="session")
def generator(engine_cfg, tmp_path_factory):
    from stream_rl.generator.client import GeneratorProcess
    from stream_rl.placement import for_job

    # Placed as `stream-rl train` places it (tiny.yaml: engine_cpus auto):
    # the engine's busy-waiting processes on cores of their own. Unplaced on
    # two cores they starved its front end, which then streamed in bursts
    # seconds late, and tests that abort "the running tail" found it done.
    from stream_rl.generator.step_trace import ENV

    # The engine traces its steps and weight loads (what `bench profile`
    # reads), so the engine tests also check the trace.
    trace = tmp_path_factory.mktemp("step-trace")
    os.environ[ENV] = str(trace)
    try:
        gen = GeneratorProcess(engine_cfg, tmp_path_factory.mktemp("generator"), placement=for_job(engine_cfg))
    finally:
        del os.environ[ENV]
    gen.step_trace = trace
    yield gen
    gen.stop()


# Mean |engine - learner| log-prob over the tokens labelled with the current
# version, in either mode: ~4e-7 seen in float32. A sync in stream mode
# preempts the running requests, so their KV is recomputed on the new weights;
# while it kept the old weights' KV, their later tokens missed by up to 8e-3.
LOGPROB_GAP = 1e-4


def logprob_gaps_within(records: list[dict], gap: float = LOGPROB_GAP) -> bool:
    """Every step that measured the engine/learner gap (tokens of the
    learner's own version) is within `gap`, and some step measured it; a
    step with nothing to measure logs NaN and 0 tokens."""
    measured = [r for r in records if r["rollout_logprob_tokens"] > 0]
    assert all(r["rollout_logprob_abs_diff"] != r["rollout_logprob_abs_diff"]  # NaN
               for r in records if r["rollout_logprob_tokens"] == 0)
    return bool(measured) and all(r["rollout_logprob_abs_diff"] < gap for r in measured)


def cfg_with(cfg, **changes):
    """`cfg` with `section__field=value` changes, validated like a file."""
    import msgspec

    from stream_rl.config import config_from_dict

    raw = msgspec.to_builtins(cfg)
    for key, value in changes.items():
        if key == "mode":  # the one top-level key
            raw[key] = value
            continue
        section, name = key.split("__")
        raw[section][name] = value
    return config_from_dict(raw)


@pytest.fixture(scope="session")
def world(engine_cfg):
    """The tiny tokenizer and training prompts."""
    from transformers import AutoTokenizer

    from stream_rl.data import PromptDataset

    tok = AutoTokenizer.from_pretrained(engine_cfg.model.path)
    return tok, PromptDataset.load(engine_cfg.data, tok)
