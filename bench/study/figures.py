"""Study figures (seaborn): the study's own plot and the training curves of its runs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # headless: reports are rebuilt on servers
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from bench.io import atomic_write
from bench.study.spec import StudySpec

class Panel(NamedTuple):
    """One curves panel: the metrics it plots (a method without the first plots the next: SSMAE's
    teacher only scores new images, logged as `admit_conf`, while its gate is open), its title,
    the factor to percent (None: not a rate, free axis; rates are drawn on 0-100 so a seed band
    where few images were admitted cannot stretch the axis), and whether it is drawn only when a
    run logged it."""
    names: tuple[str, ...]
    title: str
    to_percent: float | None = None
    optional: bool = False


CURVES = [Panel(("val_acc_ema",), "validation accuracy (EMA) %"),
          Panel(("train.pl_rate",), "pseudo-label admission rate %", 100),
          Panel(("train.pl_precision",), "pseudo-label precision %", 100),
          Panel(("train.pl_conf", "train.admit_conf"), "mean teacher confidence (weak view) %", 100),
          Panel(("train.loss_sup",), "labeled loss (CE, training views)"),
          Panel(("gate.hc_acc",), "gate: accuracy of confident validation images %", 1, optional=True)]


def panel_series(metrics: dict, panel: Panel) -> tuple[list, list] | None:
    """(steps, values in the panel's unit) of the first of its metrics a run logged, or None.
    A gate reading with no confident image has no accuracy (logged as 0): left out."""
    name = next((n for n in panel.names if metrics.get(n)), None)
    if name is None:
        return None
    points = list(zip(metrics[name]["steps"], metrics[name]["values"]))
    if name == "gate.hc_acc":
        counts = metrics.get("gate.hc_count") or {}
        counts = dict(zip(counts.get("steps", []), counts.get("values", [])))
        points = [(t, v) for t, v in points if counts.get(t, 1) > 0]
    scale = panel.to_percent or 1
    return [t for t, _ in points], [scale * v for _, v in points]


def save(fig, stem: Path) -> None:
    # no creation date in the PDF: a report rebuilt from the same records is the same bytes
    for ext, meta in (("png", {}), ("pdf", {"CreationDate": None})):
        atomic_write(stem.with_suffix(f".{ext}"), lambda tmp, e=ext, m=meta: fig.savefig(
            tmp, format=e, dpi=150, bbox_inches="tight", metadata=m))
    plt.close(fig)


def study_figure(summary: pd.DataFrame, refs: pd.DataFrame, spec: StudySpec, stem: Path, title: str) -> plt.Figure:
    fig_spec = spec.figure or {}
    kind = fig_spec.get("kind", "line" if spec.axes else "bar")
    x = None if kind == "bar" else fig_spec.get("x") or next(iter(spec.axes))
    summary = with_series(summary, fig_spec.get("hue") or "method")
    ok = summary[summary["n"] > 0]
    with_precision = bool(fig_spec.get("precision")) and ok["pl_precision_mean"].notna().any()
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, 2 if with_precision else 1, figsize=(11 if with_precision else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ylabel = f"{spec.metric} (%)"
    if kind == "bar":
        labels = ok["method"] + ok["variant"].map(lambda v: f"\n{v}" if isinstance(v, str) else "")
        data = ok.assign(label=labels)
        ax.bar(data["label"], data["mean"], yerr=data["std"].fillna(0), capsize=4,
               color=sns.color_palette(n_colors=max(1, len(data))))
        for i, (m, n) in enumerate(zip(data["mean"], data["n"])):
            ax.annotate(f"{m:.1f}\n(n={n})", (i, m), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 3), textcoords="offset points")
        ax.tick_params(axis="x", rotation=30)
        ax.set_ylabel(ylabel)
    else:
        variants = list(dict.fromkeys(v for v in ok["variant"] if isinstance(v, str)))  # main solid, each its own dash
        styles = {v: VARIANT_STYLES[i % len(VARIANT_STYLES)] for i, v in enumerate(variants)}
        ok = ok.assign(style=[styles.get(v, "-") for v in ok["variant"]])
        groups = list(ok.groupby("series", sort=False))
        keys = list(dict.fromkeys(ok["colour"]))
        colours = dict(zip(keys, sns.color_palette(n_colors=max(1, len(keys)))))  # both panels
        for key, g in groups:
            g = g.sort_values(x)
            ax.errorbar(g[x].astype(float), g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3,
                        color=colours[g["colour"].iloc[0]], linestyle=g["style"].iloc[0], label=key)
        if len(refs):
            for key, g in refs.groupby("method", sort=False):
                ax.plot(g[x].astype(float), g["mean"], linestyle="--", marker="x", label=str(key))
        if fig_spec.get("logx"):
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        if with_precision:  # admission beside precision, on 0-100 % with seed spread: a flat line reads flat
            pax = axes[0, 1]
            for key, g in groups:
                g = g.sort_values(x)
                # a method without pseudo-labels has no line here, nor a reference (a control's are
                # what its teacher would admit; nothing trained on them)
                if g["pl_rate_mean"].isna().all() or g["variant"].iloc[0] in spec.references:
                    continue
                for name, style, what in (("pl_precision", "-", "precision"), ("pl_rate", "--", "admitted")):
                    pax.errorbar(g[x].astype(float), 100 * g[f"{name}_mean"], yerr=100 * g[f"{name}_std"].fillna(0),
                                 marker="o", capsize=3, linestyle=style, color=colours[g["colour"].iloc[0]],
                                 label=f"{key}: {what}")
            pax.set_ylim(0, 100)
            if fig_spec.get("logx"):
                pax.set_xscale("log")
            pax.set_xlabel(x)
            pax.set_ylabel("pseudo-labels, last tenth of training (%)")
        legends_below(fig)
    if (summary["n"] == 0).any():  # failed or unrun cells are shown as missing, never as zero
        # hung from its top below everything under the axes: a long note grows downward, over nothing
        fig.text(0.01, lowest(fig) - 0.02, f"missing (no finished run): {missing_note(summary, x)}",
                 fontsize=7, color="firebrick", wrap=True, va="top")
    fig.suptitle(title, fontsize=9)
    save(fig, stem)
    return fig


VARIANT_STYLES = ("--", ":", "-.")


def legends_below(fig: plt.Figure) -> None:
    """Each axes' legend in two columns under its x label: with a dozen lines, a legend inside
    the axes covers points wherever it goes."""
    fig.draw_without_rendering()  # the labels' places are known only once laid out (once for all axes)
    for ax in fig.axes:
        if not ax.get_legend_handles_labels()[0]:  # an empty report (nothing finished yet) has none
            continue
        label = ax.xaxis.label.get_window_extent()
        top = ax.transAxes.inverted().transform((0, label.y0))[1]
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, top - 0.02), ncol=2, frameon=False)


def lowest(fig: plt.Figure) -> float:
    """The figure-fraction height of the lowest thing drawn under any axes (tick labels,
    x label, a legend hung below)."""
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    return min(fig.transFigure.inverted().transform((0, ax.get_tightbbox(renderer).y0))[1] for ax in fig.axes)


def with_series(summary: pd.DataFrame, hue: str) -> pd.DataFrame:
    """The summary with each row's line: `colour` (one per hue value, and per method where
    several share a hue axis) and `series`, its label, which adds the variant: a method's
    control or reference is its own line in the method's colour, never joined to its points."""
    several = summary["method"].nunique() > 1
    colours = [str(r["method"]) if hue == "method" or hue not in summary else
               (f"{r['method']} " if several else "") + f"{hue}={r[hue]}" for _, r in summary.iterrows()]
    series = [c + (f" [{v}]" if isinstance(v, str) else "") for c, v in zip(colours, summary["variant"])]
    return summary.assign(colour=colours, series=series)


def missing_note(summary: pd.DataFrame, x: str | None) -> str:
    """The lines (`with_series`) that lack a finished run, per value of `x` ("every line" where
    none has one)."""
    def lacking(rows: pd.DataFrame) -> list[str]:
        return list(dict.fromkeys(rows.loc[rows["n"] == 0, "series"]))
    if x is None:
        return ", ".join(lacking(summary))
    parts = []
    for value, rows in summary.groupby(x, sort=True):
        if names := lacking(rows):
            every = len(names) == rows["series"].nunique()
            parts.append(f"{x}={value}: " + ("every line" if every else ", ".join(names)))
    return "; ".join(parts)


def curves_figure(runs: pd.DataFrame, results_dir: Path, stem: Path, title: str) -> plt.Figure:
    """Per group (mean over seeds): validation accuracy, admission rate, precision, teacher
    confidence and labeled loss vs step.
    A method keeps one colour (and a setting one dash) in every panel, including the panels
    that only the semi-supervised methods appear in."""
    frames = []
    for _, row in runs.dropna(subset=["run_id"]).iterrows():
        try:
            metrics = json.loads((results_dir / "runs" / str(row["run_id"]) / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        for panel in CURVES:
            series = panel_series(metrics, panel)
            if series:
                frames.append(pd.DataFrame({"step": series[0], "value": series[1], "metric": panel.names[0],
                                            "method": row["method"], "setting": row["group"].split("|", 1)[-1]}))
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "value", "metric", "method", "setting"])
    panels = [p for p in CURVES if not p.optional or (data["metric"] == p.names[0]).any()]
    sns.set_theme(style="whitegrid", context="paper")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    methods = list(dict.fromkeys(data["method"]))
    palette = dict(zip(methods, sns.color_palette(n_colors=max(1, len(methods)))))
    settings = list(dict.fromkeys(data["setting"]))
    # dashes only when a setting is more than its method's name, and no more settings than dash styles
    styled = (data["setting"] != data["method"]).any() and 1 < len(settings) <= 6
    for ax, panel in zip(axes, panels):
        d = data[data["metric"] == panel.names[0]]
        if len(d):
            sns.lineplot(d, x="step", y="value", hue="method", hue_order=[m for m in methods if m in set(d["method"])],
                         palette=palette, style="setting" if styled else None,
                         style_order=[s for s in settings if s in set(d["setting"])] if styled else None,
                         ax=ax, errorbar="sd", legend=ax is axes[0])
        else:  # e.g. runs recorded before a method logged it: say so rather than draw an empty frame
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="grey")
        ax.set_title(panel.title, fontsize=9)
        ax.set_ylabel("")
        if panel.to_percent is not None:
            ax.set_ylim(0, 100)
    if axes[0].get_legend():
        sns.move_legend(axes[0], "upper left", bbox_to_anchor=(0, -0.15), fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=9)
    save(fig, stem)
    return fig
