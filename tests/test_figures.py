"""The study report's curves figure: one colour per method across its panels."""
import json

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex

from bench.figures import curves_figure

STEPS = [100, 200, 300]


def write_run(results, run_id, metrics):
    run = results / "runs" / str(run_id)
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({k: {"steps": STEPS, "values": v} for k, v in metrics.items()}))


def colour_of(ax, values):
    """Colour of the line in `ax` that plots `values` over STEPS."""
    for line in ax.get_lines():
        if np.allclose(line.get_xdata(), STEPS) and np.allclose(line.get_ydata(), values):
            return to_hex(line.get_color())
    raise AssertionError(f"no line plots {values}")


def test_a_method_keeps_its_colour_in_panels_other_methods_are_absent_from(tmp_path):
    results = tmp_path / "results"
    write_run(results, 1, {"val_acc_ema": [30.0, 40.0, 50.0]})
    write_run(results, 2, {"val_acc_ema": [31.0, 42.0, 53.0], "train.pl_rate": [0.1, 0.2, 0.3],
                           "train.pl_precision": [0.7, 0.75, 0.8]})
    runs = pd.DataFrame({"run_id": [1, 2], "method": ["supervised", "fixmatch"], "group": ["supervised", "fixmatch"]})
    fig = curves_figure(runs, results, tmp_path / "curves", "t")
    val, rate, precision = fig.axes[:3]
    fixmatch = colour_of(val, [31.0, 42.0, 53.0])
    assert fixmatch != colour_of(val, [30.0, 40.0, 50.0])
    assert colour_of(rate, [0.1, 0.2, 0.3]) == fixmatch
    assert colour_of(precision, [0.7, 0.75, 0.8]) == fixmatch
    # settings that are just the method names get no second legend of dashes
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["supervised", "fixmatch"]
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "curves.pdf").stat().st_size > 0
