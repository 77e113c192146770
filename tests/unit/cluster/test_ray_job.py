"""The Ray launcher's refusals, before anything is placed."""

from __future__ import annotations

import sys

import pytest

from stream_rl.cluster.ray_job import RayError, train_on_ray
from stream_rl.config import load_config
from tests.conftest import ROOT


def test_without_ray_installed_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(RayError, match=r"stream-rl\[ray\]"):
        train_on_ray(load_config(ROOT / "configs" / "tiny.yaml", ["launch=ray"]), tmp_path)
