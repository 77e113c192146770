"""The pruning bound (`bench pruning-bound`): the tokens per trained sample
that pruning at L_detect can reach, by the oracle that keeps the shortest."""

from __future__ import annotations


from tests.conftest import ROOT


def test_the_cli_samples_the_tiny_model(tiny_world, tmp_path):
    import json

    from stream_rl.cli import main

    d = tiny_world["dir"]
    out = tmp_path / "bound.json"
    args = ["bench", "pruning-bound", "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"model.path={d / 'model'}", "--set", f"data.path={d / 'data' / 'train.jsonl'}",
            "--set", "generator.max_tokens=48", "--set", "pruner.l_detect=16", "--samples", "2", "--json", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    (m,) = res["models"].values()
    assert res["samples_per_prompt"] == 2 and m["rollouts"] == 2 * m["groups"] and m["groups"] > 0
    assert 0 < m["tokens_per_sample_nopruning"] <= 48
    assert m["oracle_ratio"] <= m["random_ratio"] + 1e-9
    assert main(args[:-4] + ["--samples", "0"]) == 2
    assert main(args[:-4] + ["--models", str(tmp_path / "nowhere")]) == 2
