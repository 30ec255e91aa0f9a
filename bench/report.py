"""`bench report`: tables and figures of a study, rebuilt from the stores alone.

Cells come from the Optuna study (which trial ran which cell), numbers from the Sacred run each
COMPLETE trial links to (its run.json result and metrics.json curves). One COMPLETE trial per
cell is counted; failed or missing cells show as missing, never as zero. Every file is written
atomically.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from optuna.trial import TrialState

from bench.io import atomic_write_text
from bench.studies import Cell, StudySpec

PRECISION = "train.pl_precision"


def collect(spec: StudySpec, study, cells: list[Cell], results_dir: Path) -> pd.DataFrame:
    """One row per cell: its axes, variant, seed and, where a COMPLETE run exists, its numbers."""
    first: dict[str, Any] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        key = t.user_attrs.get("cell")
        if t.state == TrialState.COMPLETE and key is not None and key not in first:
            first[key] = t
    rows = []
    for cell in cells:
        row: dict[str, Any] = {"method": cell.method, **dict(cell.axes), "variant": cell.variant,
                               "seed": cell.seed, "cell": cell.key, "group": cell.group, "run_id": None}
        trial = first.get(cell.key)
        if trial is not None and trial.user_attrs.get("run_id"):
            run_dir = results_dir / "runs" / str(trial.user_attrs["run_id"])
            record = _json(run_dir / "run.json")
            if record.get("status") == "COMPLETED":
                result = record.get("result") or {}
                row.update(run_id=run_dir.name, trial=trial.number, **{
                    k: result.get(k) for k in ("test_acc", "test_acc_ema", "test_acc_selected",
                                               "selected_val_acc", "minutes")})
                row["pl_precision"] = _last(_json(run_dir / "metrics.json"), PRECISION)
        rows.append(row)
    return pd.DataFrame(rows)


def summarise(df: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """mean, std and n over seeds per group; a group with no finished run has n = 0 and NaN."""
    keys = ["method", *spec.axes, "variant"]
    out = []
    for _, g in df.groupby("group", sort=False):
        values = pd.to_numeric(g[spec.metric], errors="coerce").dropna() if spec.metric in g else pd.Series([], dtype=float)
        prec = pd.to_numeric(g["pl_precision"], errors="coerce").dropna() if "pl_precision" in g else pd.Series([], dtype=float)
        first = g.iloc[0]
        out.append({**{k: first[k] for k in keys}, "mean": values.mean() if len(values) else math.nan,
                    "std": values.std(ddof=1) if len(values) > 1 else (0.0 if len(values) == 1 else math.nan),
                    "n": int(len(values)), "cells": int(len(g)),
                    "pl_precision": prec.mean() if len(prec) else math.nan})
    return pd.DataFrame(out)


def reference_rows(spec: StudySpec, dataset: str) -> pd.DataFrame:
    """The paper's published numbers for this dataset as rows beside ours."""
    ref = (spec.reference or {}).get(dataset) or {}
    axis = next(iter(spec.axes), None)
    rows = []
    for method, values in ref.items():
        for x, v in (values or {}).items():
            rows.append({"method": f"{method} (paper)", **({axis: x} if axis else {}), "variant": None,
                         "mean": float(v), "std": math.nan, "n": 0, "cells": 0, "pl_precision": math.nan})
    return pd.DataFrame(rows)


def fmt(mean: float, std: float, n: int, reference: bool = False) -> str:
    if reference:
        return f"{mean:.2f}"
    if n == 0 or pd.isna(mean):
        return "—"
    return f"{mean:.2f} ({n})" if n == 1 else f"{mean:.2f} ± {std:.2f} ({n})"


def pivot(summary: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """Rows: method (and variant, and all axes but the first); columns: the first axis."""
    s = summary.copy()
    s["label"] = s["method"] + s["variant"].map(lambda v: f" [{v}]" if isinstance(v, str) else "")
    axes = list(spec.axes)
    for extra in axes[1:]:
        s["label"] += s[extra].map(lambda v, e=extra: f" {e}={v}")
    s["value"] = [fmt(m, sd, n, n == 0 and "(paper)" in lab)
                  for m, sd, n, lab in zip(s["mean"], s["std"], s["n"], s["label"])]
    if not axes:
        return s.set_index("label")[["value"]].rename(columns={"value": spec.metric})
    table = s.pivot_table(index="label", columns=axes[0], values="value", aggfunc="first", sort=False)
    table = table.reindex(columns=sorted(table.columns, key=float))
    return table.fillna("—")


def markdown(table: pd.DataFrame, title: str) -> str:
    cols = [str(c) for c in table.columns]
    lines = [f"### {title}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, row in table.iterrows():
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row.values) + " |")
    return "\n".join(lines) + "\n"


def latex(table: pd.DataFrame, caption: str) -> str:
    esc = lambda s: str(s).replace("_", r"\_").replace("±", r"$\pm$").replace("—", "--").replace("%", r"\%")
    cols = [esc(c) for c in table.columns]
    body = [" & ".join([esc(label)] + [esc(v) for v in row.values]) + r" \\" for label, row in table.iterrows()]
    return "\n".join([r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}",
                      r"\begin{tabular}{l" + "c" * len(cols) + "}", r"\toprule",
                      " & ".join([""] + cols) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}",
                      r"\end{table}"]) + "\n"


def write_report(spec: StudySpec, study, cells: list[Cell], results_dir: Path, dataset: str,
                 preset: str | None) -> Path:
    """Write runs.csv, summary.csv, table.{csv,md,tex}, figure.{png,pdf}, curves.{png,pdf}."""
    out = results_dir / "reports" / spec.name / f"{dataset}-{preset or 'default'}"
    df = collect(spec, study, cells, results_dir)
    summary = summarise(df, spec)
    refs = reference_rows(spec, dataset)
    shown = pd.concat([summary, refs], ignore_index=True) if len(refs) else summary
    table = pivot(shown, spec)
    title = f"{spec.name} on {dataset} ({preset or 'default'} preset): {spec.metric}, mean ± std (n seeds)"
    atomic_write_text(out / "runs.csv", df.to_csv(index=False))
    atomic_write_text(out / "summary.csv", shown.to_csv(index=False))
    atomic_write_text(out / "table.csv", table.to_csv())
    atomic_write_text(out / "table.md", markdown(table, title))
    atomic_write_text(out / "table.tex", latex(table, title))
    from bench.figures import curves_figure, study_figure
    study_figure(summary, refs, spec, out / "figure", title)
    curves_figure(df, results_dir, out / "curves", f"{spec.name} on {dataset}: training curves")
    return out


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _last(metrics: dict, name: str) -> float:
    values = (metrics.get(name) or {}).get("values") or []
    return float(values[-1]) if values else math.nan
