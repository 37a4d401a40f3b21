"""The report's PNG plots, drawn from a hand-made trials frame with ``report.trials_frame``'s columns."""

import math
import struct

import pandas as pd
import pytest

from precsearch.report import plots
from precsearch.report.plots import _label, block_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["trial", "state", "fp16", "bf16", "fp32", "plan", "latency_ms", "measured_ms", "baseline_ms", "speedup",
           "error", "constraint", "feasible", "peak_memory_mb", "duration_s", "failure"]


def trial(number, state, plan, latency, error, limit=0.01, failure=None):
    complete = state == "COMPLETE"
    constraint = None if error is None else (error - limit if math.isfinite(error) else math.inf)
    return {"trial": number, "state": state, "fp16": plan.count("h"), "bf16": plan.count("b"),
            "fp32": plan.count("f"), "plan": plan, "latency_ms": latency, "measured_ms": latency,
            "baseline_ms": 10.0, "speedup": None if latency is None else 10.0 / latency, "error": error,
            "constraint": constraint, "feasible": constraint is not None and constraint <= 0 and complete,
            "peak_memory_mb": None, "duration_s": 0.5, "failure": failure}


def frame(rows=None):
    rows = rows if rows is not None else [
        trial(0, "COMPLETE", "ffff", 10.0, 0.0),
        trial(1, "COMPLETE", "bbbb", 6.0, 0.03),                  # infeasible
        trial(2, "COMPLETE", "hhhh", 5.0, math.inf),               # non-finite output
        trial(3, "COMPLETE", "bbbf", 7.0, 0.004),
        trial(4, "COMPLETE", "bbff", 8.5, 0.002),
        trial(5, "COMPLETE", "bfff", 9.0, 0.005),                  # dominated
        trial(6, "PRUNED", "hbbb", None, None),
        trial(7, "FAIL", "hbbf", None, None, failure="RuntimeError: boom"),
        trial(8, "RUNNING", "hhbf", None, None),
    ]
    data = pd.DataFrame(rows)
    assert list(data.columns) == COLUMNS
    return data


def png_size(path):
    """(width, height) in pixels, from a valid PNG's header."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def test_columns_match_report_trials_frame():
    import inspect

    from precsearch.report import summary as report
    source = inspect.getsource(report.trials_frame)
    for column in COLUMNS:
        if column not in ("fp16", "bf16", "fp32"):        # added per precision
            assert f'"{column}"' in source, column


# -- block_of and _label ----------------------------------------------------------------------------
@pytest.mark.parametrize(("unit", "block"), [
    ("encoder.layer.3.attention.self.query", "encoder.layer.3"),
    ("encoder.layer.12", "encoder.layer.12"),
    ("blocks.0.fc1", "blocks.0"),
    ("transformer.h.1.mlp.c_fc", "transformer.h.1"),
    ("stem", "stem"),
    ("pooler.dense", "pooler"),
    ("x.1a.b", "x"),                      # a number must be a whole part
    ("", "<root>"),
])
def test_block_of(unit, block):
    assert block_of(unit) == block


def test_label():
    assert _label("encoder.layer.3.attention.self.query", "encoder.layer.3") == "self.query"
    assert _label("encoder.layer.3.output.dense", "encoder.layer.3") == "output.dense"
    assert _label("blocks.0.fc1", "blocks.0") == "fc1"
    assert _label("stem", "stem") == "stem"
    assert _label("", "<root>") == "<root>"
    assert _label("pooler.dense", "pooler") == "dense"
    assert _label("blocks.0.a_really_long_unit_name", "blocks.0") == "a_really_long_uni…"
    assert all(len(_label(f"b.0.{'x' * n}", "b.0")) <= 18 for n in range(1, 40))


# -- the plots -------------------------------------------------------------------------------------
def test_tradeoff_writes_a_png(tmp_path):
    path = plots.tradeoff(frame(), 0.01, 10.0, 3, tmp_path / "tradeoff.png", "rel_l2")
    assert path == tmp_path / "tradeoff.png"
    assert png_size(path) == (880, 550)           # 8 x 5 inches at 110 dpi


@pytest.mark.filterwarnings("ignore:Attempting to set identical low and high ylims")
@pytest.mark.parametrize("rows", [
    [trial(0, "COMPLETE", "ffff", 10.0, 0.0)],                            # only the baseline: error 0
    [trial(0, "COMPLETE", "bbbb", 6.0, 0.5), trial(1, "COMPLETE", "hhhh", 5.0, math.inf)],  # nothing feasible
    [trial(0, "COMPLETE", "hhhh", 5.0, math.inf)],                         # nothing finite
    [trial(0, "PRUNED", "bbbb", None, None)],                              # nothing complete
], ids=["baseline_only", "none_feasible", "none_finite", "none_complete"])
def test_tradeoff_handles_degenerate_searches(tmp_path, rows):
    path = plots.tradeoff(frame(rows), 0.01, 10.0, None, tmp_path / "t.png", "cosine")
    assert png_size(path) == (880, 550)


def test_tradeoff_ignores_a_chosen_trial_not_in_the_frame(tmp_path):
    path = plots.tradeoff(frame(), 0.01, 10.0, 99, tmp_path / "t.png", "rel_l2")
    assert png_size(path) == (880, 550)


def test_progress_writes_a_png(tmp_path):
    path = plots.progress(frame(), 10.0, tmp_path / "progress.png")
    assert path == tmp_path / "progress.png"
    assert png_size(path) == (880, 396)           # 8 x 3.6 inches
    empty = plots.progress(frame([trial(0, "PRUNED", "bbbb", None, None)]), 10.0, tmp_path / "empty.png")
    assert png_size(empty) == (880, 396)


def test_progress_does_not_change_the_frame(tmp_path):
    data = frame()
    copy = data.copy()
    plots.progress(data, 10.0, tmp_path / "p.png")
    plots.tradeoff(data, 0.01, 10.0, 3, tmp_path / "t.png", "rel_l2")
    pd.testing.assert_frame_equal(data, copy)


def test_unit_map_writes_a_png_sized_by_the_blocks(tmp_path):
    units = ["stem", "blocks.0.fc1", "blocks.0.fc2", "blocks.0.a_really_long_unit_name", "head"]
    precision = {"blocks.0.fc1": "bf16", "blocks.0.fc2": "fp16", "head": "bf16"}
    edges = [["stem", "blocks.0.fc1"], ["blocks.0.fc1", "blocks.0.fc2"], ["head", "nowhere"]]
    path = plots.unit_map(units, precision, edges, tmp_path / "units.png")
    assert path == tmp_path / "units.png"
    # 3 rows (stem, blocks.0, head), widest 3 boxes: 6.5 x 2.5 inches at 110 dpi
    assert png_size(path) == (715, 275)
    many = [f"layer.{i}.dense" for i in range(20)] + [""]
    tall = plots.unit_map(many, {}, [], tmp_path / "tall.png", title="all fp32")
    assert png_size(tall) == (550, round(110 * (0.32 * 21 + 1.5)))     # one row per block, min width 5 in
