"""The study report's figures: one colour per method (or setting) across their panels."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex

from bench.study.figures import curves_figure, study_figure
from bench.study.spec import StudySpec

STEPS = [100, 200, 300]


def write_run(results, run_id, metrics):
    run = results / "runs" / str(run_id)
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({k: {"steps": STEPS, "values": v} for k, v in metrics.items()}))


def colour_of(ax, values, xs=STEPS, style=None):
    """Colour of the line in `ax` that plots `values` over `xs` (with line style `style`, if given)."""
    for line in ax.get_lines():
        if (np.allclose(line.get_xdata(), xs) and np.allclose(line.get_ydata(), values)
                and style in (None, line.get_linestyle())):
            return to_hex(line.get_color())
    raise AssertionError(f"no {style or ''} line plots {values}")


def line_spec(methods, **figure):
    """A study over labels_per_class drawn as lines, FixMatch's control as its reference."""
    return StudySpec(name="pc", path=Path("pc.yaml"), methods=methods, metric="test_acc",
                     axes={"labels_per_class": {"values": [25, 50]}}, references={"control": ["fixmatch"]},
                     figure={"kind": "line", "x": "labels_per_class", **figure})


def summary_of(**columns) -> pd.DataFrame:
    """A report summary; columns not given (variant, pseudo-label statistics) are empty."""
    empty = {"variant": None, "pl_rate_mean": np.nan, "pl_rate_std": np.nan, "pl_precision_mean": np.nan,
             "pl_precision_std": np.nan}
    return pd.DataFrame({**empty, **columns})


def test_a_method_keeps_its_colour_in_panels_other_methods_are_absent_from(tmp_path):
    results = tmp_path / "results"
    write_run(results, 1, {"val_acc_ema": [30.0, 40.0, 50.0]})
    write_run(results, 2, {"val_acc_ema": [31.0, 42.0, 53.0], "train.pl_rate": [0.1, 0.2, 0.3],
                           "train.pl_precision": [0.7, 0.75, 0.8], "train.loss_sup": [2.0, 1.5, 1.2]})
    runs = pd.DataFrame({"run_id": [1, 2], "method": ["supervised", "fixmatch"], "group": ["supervised", "fixmatch"]})
    fig = curves_figure(runs, results, tmp_path / "curves", "t")
    val, rate, precision = fig.axes[:3]
    fixmatch = colour_of(val, [31.0, 42.0, 53.0])
    assert fixmatch != colour_of(val, [30.0, 40.0, 50.0])
    assert colour_of(rate, [10.0, 20.0, 30.0]) == fixmatch           # fractions drawn as percent
    assert colour_of(precision, [70.0, 75.0, 80.0]) == fixmatch
    assert rate.get_ylim() == precision.get_ylim() == (0, 100) and "%" in precision.get_title()
    assert colour_of(fig.axes[4], [2.0, 1.5, 1.2]) == fixmatch and "labeled loss" in fig.axes[4].get_title()
    assert len(fig.axes) == 5  # no run has a gate: no gate panel
    # settings that are just the method names get no second legend of dashes
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["supervised", "fixmatch"]
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "curves.pdf").stat().st_size > 0


def test_the_precision_panel_shows_admission_beside_precision_on_the_full_scale(tmp_path):
    spec = StudySpec(name="gate", path=Path("gate.yaml"), methods=["ssmae"], metric="test_acc_ema",
                     axes={"gate_threshold": {"values": [60, 80]}, "confidence": {"values": [0.7, 0.8]}},
                     figure={"kind": "line", "x": "gate_threshold", "hue": "confidence", "precision": True})
    summary = pd.DataFrame({"method": "ssmae", "gate_threshold": [60, 80, 60, 80], "confidence": [0.7, 0.7, 0.8, 0.8],
                            "variant": None, "mean": [51.6, 51.7, 50.0, 50.5], "std": 0.3, "n": 2,
                            "pl_rate_mean": [0.117, 0.058, 0.05, 0.02], "pl_rate_std": 0.01,
                            "pl_precision_mean": [0.826, 0.830, 0.9, 0.91], "pl_precision_std": 0.015})
    fig = study_figure(summary, pd.DataFrame(), spec, tmp_path / "figure", "t")
    acc, pls = fig.axes[:2]
    assert pls.get_ylim() == (0, 100)  # a 0.4-point wiggle in precision must not fill the panel
    for conf, rows in ((0.7, slice(0, 2)), (0.8, slice(2, 4))):
        colour = colour_of(acc, summary["mean"][rows], [60, 80], "-")
        assert colour_of(pls, 100 * summary["pl_precision_mean"][rows], [60, 80], "-") == colour
        assert colour_of(pls, 100 * summary["pl_rate_mean"][rows], [60, 80], "--") == colour
    assert colour_of(acc, summary["mean"][0:2], [60, 80], "-") != colour_of(acc, summary["mean"][2:4], [60, 80], "-")
    assert (tmp_path / "figure.png").stat().st_size > 0


def test_the_precision_panel_shares_the_log_axis_and_leaves_out_methods_without_pseudo_labels(tmp_path):
    spec = StudySpec(name="lf", path=Path("lf.yaml"), methods=["supervised", "fixmatch"], metric="test_acc_ema",
                     axes={"label_fraction": {"values": [0.01, 0.1]}},
                     figure={"kind": "line", "x": "label_fraction", "logx": True, "precision": True})
    summary = pd.DataFrame({"method": ["supervised", "supervised", "fixmatch", "fixmatch"],
                            "label_fraction": [0.01, 0.1, 0.01, 0.1], "variant": None,
                            "mean": [38.1, 50.8, 39.8, 50.0], "std": 0.5, "n": 2,
                            "pl_rate_mean": [np.nan, np.nan, 0.58, 0.19], "pl_rate_std": [np.nan, np.nan, 0.02, 0.01],
                            "pl_precision_mean": [np.nan, np.nan, 0.46, 0.78],
                            "pl_precision_std": [np.nan, np.nan, 0.01, 0.01]})
    fig = study_figure(summary, pd.DataFrame(), spec, tmp_path / "figure", "t")
    acc, pls = fig.axes[:2]
    assert acc.get_xscale() == pls.get_xscale() == "log"
    assert [t.get_text() for t in pls.get_legend().get_texts()] == ["fixmatch: precision", "fixmatch: admitted"]
    assert colour_of(pls, [46.0, 78.0], [0.01, 0.1], "-") == colour_of(acc, [39.8, 50.0], [0.01, 0.1], "-")


def test_a_gated_run_adds_the_gate_panel_without_readings_that_had_no_confident_image(tmp_path):
    results = tmp_path / "results"
    write_run(results, 1, {"val_acc_ema": [30.0, 40.0, 50.0], "gate.hc_acc": [0.0, 46.0, 52.0],
                           "gate.hc_count": [0.0, 27.0, 31.0]})
    runs = pd.DataFrame({"run_id": [1], "method": ["ssmae"], "group": ["ssmae"]})
    fig = curves_figure(runs, results, tmp_path / "curves", "t")
    gate = fig.axes[5]
    assert "gate" in gate.get_title() and gate.get_ylim() == (0, 100)
    assert colour_of(gate, [46.0, 52.0], xs=STEPS[1:]) == colour_of(fig.axes[0], [30.0, 40.0, 50.0])


def test_a_control_is_its_own_line_in_its_methods_colour_and_never_joined_to_the_method(tmp_path):
    spec = line_spec(["mae_finetune", "fixmatch"], precision=True)
    summary = pd.DataFrame({"method": ["mae_finetune"] * 2 + ["fixmatch"] * 4, "labels_per_class": [25, 50] * 3,
                            "variant": [None, None, None, None, "control", "control"],
                            "mean": [40.0, 48.2, 44.0, 51.7, 41.0, 49.0], "std": 0.5, "n": 3,
                            "pl_rate_mean": [np.nan, np.nan, 0.6, 0.67, 0.8, 0.77],
                            "pl_rate_std": [np.nan, np.nan, 0.02, 0.02, 0.02, 0.02],
                            "pl_precision_mean": [np.nan, np.nan, 0.55, 0.6, 0.5, 0.53],
                            "pl_precision_std": [np.nan, np.nan, 0.01, 0.01, 0.01, 0.01]})
    fig = study_figure(summary, pd.DataFrame(), spec, tmp_path / "figure", "t")
    acc, pls = fig.axes[:2]
    fixmatch = colour_of(acc, [44.0, 51.7], [25, 50], "-")
    assert colour_of(acc, [41.0, 49.0], [25, 50], "--") == fixmatch != colour_of(acc, [40.0, 48.2], [25, 50], "-")
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["mae_finetune", "fixmatch", "fixmatch [control]"]
    # what a control's teacher would admit trains nothing: only the method's own pseudo-labels are drawn
    assert [t.get_text() for t in pls.get_legend().get_texts()] == ["fixmatch: precision", "fixmatch: admitted"]


def test_the_missing_note_names_each_line_without_a_run_per_value_of_the_axis(tmp_path):
    spec = line_spec(["mae_finetune", "fixmatch"])
    summary = summary_of(method=["mae_finetune"] * 2 + ["fixmatch"] * 4, labels_per_class=[25, 50] * 3,
                         variant=[None, None, None, None, "control", "control"],
                         mean=[np.nan, 48.2, np.nan, 51.7, np.nan, np.nan], std=np.nan, n=[0, 3, 0, 3, 0, 0])
    fig = study_figure(summary, pd.DataFrame(), spec, tmp_path / "figure", "t")
    notes = [t.get_text() for t in fig.texts if t.get_text().startswith("missing")]
    assert notes == ["missing (no finished run): labels_per_class=25: every line; "
                     "labels_per_class=50: fixmatch [control]"]


def test_a_long_missing_note_hangs_below_the_axes_labels(tmp_path):
    methods = [f"a_method_with_a_long_name_{i}" for i in range(12)]
    spec = line_spec(methods)
    summary = summary_of(method=[m for m in methods for _ in (25, 50)], labels_per_class=[25, 50] * 12,
                         mean=[np.nan, 48.0] * 11 + [44.0, 48.0], std=np.nan,
                         n=[0, 3] * 11 + [3, 3])  # eleven lines lack a run at 25: a long note
    fig = study_figure(summary, pd.DataFrame(), spec, tmp_path / "figure", "t")
    renderer = FigureCanvasAgg(fig).get_renderer()  # the saved figure is closed: lay it out again
    (note,) = [t for t in fig.texts if t.get_text().startswith("missing")]
    box = note.get_window_extent(renderer)
    assert box.height > 2 * note.get_fontsize()  # wrapped onto several lines
    for ax in fig.axes:
        assert box.y1 < ax.xaxis.label.get_window_extent(renderer).y0  # below the label, not over it
        assert box.y1 < ax.get_legend().get_window_extent(renderer).y0  # and below the legend hung there


def test_the_legends_hang_below_their_axes_and_cover_no_point(tmp_path):
    methods = [f"method_{i}" for i in range(7)]  # a dozen lines: no corner inside the axes is free
    spec = line_spec(methods, precision=True)
    summary = summary_of(method=[m for m in methods for _ in (25, 50)], labels_per_class=[25, 50] * 7,
                         mean=[40.0 + i for i in range(14)], std=0.5, n=3, pl_rate_mean=0.5, pl_rate_std=0.02,
                         pl_precision_mean=0.6, pl_precision_std=0.01)
    fig = study_figure(summary, pd.DataFrame(), spec, tmp_path / "figure", "t")
    renderer = FigureCanvasAgg(fig).get_renderer()
    for ax in fig.axes[:2]:
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.y1 < ax.get_window_extent(renderer).y0  # under the plotting area, points and all
        assert legend.y1 < ax.xaxis.label.get_window_extent(renderer).y0  # and under the axis' own label
