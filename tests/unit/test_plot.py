"""plot_run on synthetic metrics.jsonl files: which PNGs appear, and the errors for bad input."""

import json
import math

import pytest

from stream_rl.plot import plot_run

PNG_MAGIC = b"\x89PNG"


def _records(n=12, pruning=True):
    out = []
    for i in range(n):
        lag = [0.5, 0.25, 0.125, 0.0625, 0.0625]
        r = {"step": i + 1, "wall_s": 2.0 * (i + 1), "reward_policy_mean": 0.1 + 0.05 * i,
             "gen_tokens_per_s": 1000.0 + 10 * i, "version_lag_max": i % 4,
             **{k: v for k, v in zip(("version_lag/0", "version_lag/1", "version_lag/2", "version_lag/3",
                                      "version_lag/4+"), lag)}}
        if pruning:
            r["prune/keep_rate"] = math.nan if i == 3 else 0.6 + 0.01 * i
            r["prune/rho_var_mean"] = None if i == 5 else 0.2 - 0.005 * i
        out.append(r)
    return out


def _write(run_dir, records):
    # json.dumps writes NaN as the bare token NaN, as the training logger does
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _assert_png(path):
    assert path.is_file()
    assert path.read_bytes()[:4] == PNG_MAGIC
    assert path.stat().st_size > 5000


def test_all_five_charts(tmp_path):
    recs = _records()
    for i, r in enumerate(recs):  # the mismatch monitor's keys (NaN-free steps only are drawn)
        r.update({"mismatch/mean": -0.01 * i, "mismatch/q05": -0.1 * i, "mismatch/q01": -0.3 * i})
    _write(tmp_path, recs)
    written = plot_run(tmp_path)
    names = {p.name for p in written}
    assert names == {"reward.png", "pruning.png", "throughput.png", "staleness.png", "mismatch.png"}
    for p in written:
        assert p.parent == tmp_path / "plots"
        _assert_png(p)


def test_out_dir_and_reward_mean_fallback(tmp_path):
    recs = [{"step": r["step"], "wall_s": r["wall_s"], "reward_mean": r["reward_policy_mean"]} for r in _records()]
    _write(tmp_path, recs)
    out = tmp_path / "elsewhere"
    written = plot_run(tmp_path, out)
    assert [p.name for p in written] == ["reward.png"]
    _assert_png(out / "reward.png")


def test_no_pruning_keys_no_pruning_chart(tmp_path):
    _write(tmp_path, _records(pruning=False))
    written = plot_run(tmp_path)
    assert "pruning.png" not in {p.name for p in written}
    assert not (tmp_path / "plots" / "pruning.png").exists()
    assert (tmp_path / "plots" / "reward.png").is_file()


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics"):
        plot_run(tmp_path)


def test_empty_metrics_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(FileNotFoundError, match="no records"):
        plot_run(tmp_path)


@pytest.mark.parametrize("field, match", [("reward_policy_mean", "reward"), ("wall_s", "wall_s")])
def test_missing_field_raises_naming_it(tmp_path, field, match):
    recs = _records()
    for r in recs:
        del r[field]
    _write(tmp_path, recs)
    with pytest.raises(ValueError, match=match):
        plot_run(tmp_path)
