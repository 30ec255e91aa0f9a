"""What a search leaves beside its best preset: every trial as a table, the optimization history,
each trial's validation curve (pruned ones stop early) and the parameters' importance."""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: searches run on servers
import matplotlib.pyplot as plt
import optuna
from optuna.trial import TrialState

from bench.study.figures import save
from bench.io import atomic_write_text


def write_search_report(study: optuna.Study, out: Path) -> list[str]:
    """trials.csv, history.{png,pdf}, curves.{png,pdf} and, from two finished trials on,
    importance.{png,pdf} in `out`; returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration",
                                          "intermediate_values"))
    atomic_write_text(out / "trials.csv", frame.to_csv(index=False))
    written = ["trials.csv"]
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots = [("history", optuna.visualization.matplotlib.plot_optimization_history,
              "validation accuracy of each completed trial, and the best so far (pruned trials: curves.png only)"),
             ("curves", optuna.visualization.matplotlib.plot_intermediate_values,
              "validation accuracy at each evaluation (a pruned trial's curve stops where it was pruned)")]
    if len(finished) >= 2:
        plots.append(("importance", optuna.visualization.matplotlib.plot_param_importances,
                      "PED-ANOVA importance (optuna's default) of each parameter for validation accuracy"))
    for name, plot, title in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            ax = plot(study)
        ax.set_title("", loc="left")  # optuna's own title, which ours replaces
        ax.set_title(title, fontsize=9)
        if name != "importance":
            ax.set_ylabel("validation accuracy (%)")
        save(ax.figure, out / name)
        written += [f"{name}.png", f"{name}.pdf"]
    plt.close("all")
    return written
