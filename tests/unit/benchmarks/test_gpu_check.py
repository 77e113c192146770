"""The GPU check refuses clearly where there is no CUDA device (this CPU
host): one JSON line naming the problem, exit status 2, from the Python
entry and from the script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a host without CUDA")


def test_entry_refuses_without_cuda(capsys):
    assert gpu_check.main(["--device", "cuda"]) == 2
    out, err = capsys.readouterr()
    res = json.loads(out)
    assert res["ok"] is False and res["error"] == gpu_check.NO_CUDA
    assert "no CUDA device" in err and "--device cpu --small" in err


def test_script_refuses_without_cuda():
    run = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert json.loads(run.stdout.strip().splitlines()[-1])["error"] == gpu_check.NO_CUDA
