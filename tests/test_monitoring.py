"""Online monitoring helpers: the surprise-trace figure and the TensorBoard record flattening (the runs
themselves: test_train.py)."""

import math

import numpy as np
import pytest

from worldmodel import plots
from worldmodel.training.tensorboard import flatten_record


def test_surprise_trace_writes_a_png_and_checks_its_inputs(tmp_path):
    s = np.abs(np.random.default_rng(0).normal(size=30)) + 1.0
    s[4] = np.nan  # a dropped frame
    observed = np.isfinite(s)
    path = plots.surprise_trace(s, tmp_path / "surprise.png", threshold=2.5, event=(10, 15), observed=observed,
                                event_label="teleport at step 10")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.surprise_trace(s, tmp_path / "plain.png").stat().st_size > 1000  # no threshold, no event
    with pytest.raises(ValueError, match="event must be"):
        plots.surprise_trace(s, tmp_path / "bad.png", event=(25, 40))
    with pytest.raises(ValueError, match="observed must have length 30"):
        plots.surprise_trace(s, tmp_path / "bad.png", observed=observed[:5])
    y = np.random.default_rng(1).normal(size=(30, 2))
    assert plots.filter_replay(y, y, np.ones_like(y), observed, tmp_path / "filter.png", event=(10, 15)).is_file()


def test_flatten_record_names_the_readout_targets_and_skips_non_numbers():
    record = {"kind": "eval", "step": 7, "targets": ["x", "v"], "r2": {"kalman": [0.5, 0.25]},
              "predictive": {"k=1": {"nll": 1.5, "coverage_1sigma": 0.7}}, "note": "text", "flag": True,
              "bad": math.nan}
    assert flatten_record(record, "eval/") == {"eval/r2/kalman/x": 0.5, "eval/r2/kalman/v": 0.25,
                                               "eval/predictive/k=1/nll": 1.5,
                                               "eval/predictive/k=1/coverage_1sigma": 0.7}
    assert flatten_record({"kind": "train", "step": 3, "loss": 2.0, "lr": 1e-3, "x": [1, 2, 3]}, "train/") == {
        "train/loss": 2.0, "train/lr": 1e-3, "train/x/0": 1.0, "train/x/1": 2.0, "train/x/2": 3.0}
