"""`bench report`: tables and figures of a study, rebuilt from the stores alone.

Cells come from the Optuna study (which trial ran which cell), numbers from the Sacred run each
COMPLETE trial links to (its run.json result and metrics.json curves). One COMPLETE trial per
cell is counted; failed or missing cells show as missing, never as zero. Every file is written
atomically.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from bench.study import compare
from bench.io import atomic_write_text, read_json
from bench.method.base import get_method
from bench.study.records import finished_trials, save as save_records, val_images
from bench.study.spec import Cell, StudySpec

RESULTS = ("test_acc", "test_acc_ema", "test_acc_selected", "val_acc", "val_acc_ema", "selected_val_acc", "minutes",
           "stage_minutes", "img_per_s")
# Pseudo-label health at the end of a run: the mean over its last tenth of logged steps.
HEALTH = {"pl_rate": "train.pl_rate", "pl_precision": "train.pl_precision"}
# What a no-axis study's table shows per method / variant, in this order.
COLUMNS = {"test_acc": "test acc final", "test_acc_ema": "test acc EMA", "test_acc_selected": "test acc selected",
           "pl_rate": "admission %", "pl_precision": "precision %", "minutes": "minutes",
           "stage_minutes": "+ stage minutes", "img_per_s": "img/s"}
PERCENT = {"pl_rate", "pl_precision"}  # stored as fractions, shown as percentages


def collect(spec: StudySpec, study, cells: list[Cell], results_dir: Path) -> pd.DataFrame:
    """One row per cell: its axes, variant, seed and, where a COMPLETE run exists, its numbers,
    its pseudo-label health and where it came from (commit, versions, device)."""
    first = finished_trials(study)
    rows = []
    for cell in cells:
        row: dict[str, Any] = {"method": cell.method, **dict(cell.axes), "variant": cell.variant,
                               "seed": cell.seed, "cell": cell.key, "group": cell.group, "run_id": None}
        trial = first.get(cell.key)
        if trial is not None and trial.user_attrs.get("run_id"):
            run_dir = results_dir / "runs" / str(trial.user_attrs["run_id"])
            record = read_json(run_dir / "run.json")
            if record.get("status") == "COMPLETED":
                result = record.get("result") or {}
                metrics = read_json(run_dir / "metrics.json")
                row.update(run_id=run_dir.name, trial=trial.number, **{k: result.get(k) for k in RESULTS})
                row.update(pseudo_label_health(metrics, result.get("steps")))
                row.update(gate_of(metrics))
                row.update(budget_of(result, cell.method))
                row["val_images"] = val_images(run_dir)
                row["start"] = start_label(read_json(run_dir / "config.json"), cell.method)
                row.update(provenance(record))
        rows.append(row)
    return pd.DataFrame(rows)


BUDGET = ("labeled_images", "unlabeled_images", "forward_images")


def start_label(config: dict, method: str) -> str | None:
    """Where a run's weights started (a record made before the option existed: its default)."""
    from bench.config import defaults
    from bench.method.stage import describe_start
    if not config:
        return None
    cls = get_method(method)
    return describe_start({**defaults(cls), **config}, cls)


def budget_of(result: dict, method: str) -> dict[str, Any]:
    """A run's budget with its earlier stages': optimizer steps per stage in pipeline order
    ("6000 + 500 + 2000": pretraining, fine-tuning, own), and labeled, unlabeled and forward-pass
    images summed over all of them."""
    stages = result.get("stages") or []
    if isinstance(stages, dict):  # records that keyed stages by name: the method declares the order
        from bench.method.stage import PRETRAIN
        stages = [stages[s.name] for s in (PRETRAIN, *get_method(method).stages) if s.name in stages]
    parts = [s.get("budget") or {} for s in stages] + [result.get("budget") or {}]
    if not parts[-1]:
        return {}
    out: dict[str, Any] = {"steps": " + ".join(str(p.get("steps", "?")) for p in parts)}
    for key in BUDGET:
        out[key] = sum(p.get(key, 0) for p in parts)
    return out


def provenance(record: dict) -> dict[str, Any]:
    """Commit, dirty flag, package versions and device of a Sacred run record."""
    experiment, host = record.get("experiment") or {}, record.get("host") or {}
    repo = (experiment.get("repositories") or [{}])[0]
    deps = dict(d.split("==", 1) for d in experiment.get("dependencies") or [] if "==" in d)
    return {"commit": repo.get("commit"), "dirty": repo.get("dirty"), "device": accelerator_of(host),
            **{f"version.{name}": deps.get(name) for name in ("ssvit-bench", "torch", "timm", "optuna")}}


def accelerator_of(host: dict) -> str | None:
    """The GPU's name, or for a CPU run its model and kernel set (e.g. "CPU (AMD EPYC, AVX2)"):
    float results of one seed differ between CPUs, so a table says which CPU made each row."""
    accelerator = host.get("accelerator") or {}
    name = accelerator.get("name")
    if name != "CPU":
        return name
    parts = [p for p in (host.get("cpu"), accelerator.get("cpu_capability")) if p]
    return f"CPU ({', '.join(parts)})" if parts else name


def _stats(values: pd.Series) -> tuple[float, float, int]:
    """(mean, std, n); std is NaN below two values: one seed shows no variance, not zero."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    n = len(values)
    return (values.mean() if n else math.nan), (values.std(ddof=1) if n > 1 else math.nan), n


def summarise(df: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """Per group: mean, std and n over seeds of the study's metric, and mean / std of every
    reported column; a group with no finished run has n = 0 and NaN."""
    keys = ["method", *spec.axes, "variant"]
    out = []
    for _, g in df.groupby("group", sort=False):
        first = g.iloc[0]
        mean, std, n = _stats(g[spec.metric]) if spec.metric in g else (math.nan, math.nan, 0)
        row = {**{k: first[k] for k in keys}, "mean": mean, "std": std, "n": n, "cells": int(len(g))}
        for col in COLUMNS:
            m, sd, _ = _stats(g[col]) if col in g else (math.nan, math.nan, 0)
            row[f"{col}_mean"], row[f"{col}_std"] = m, sd
        out.append(row)
    return pd.DataFrame(out)


def reference_rows(spec: StudySpec, dataset: str) -> pd.DataFrame:
    """The paper's published numbers for this dataset as rows beside ours."""
    ref = (spec.reference or {}).get(dataset) or {}
    axis = next(iter(spec.axes), None)
    rows = []
    for method, values in ref.items():
        for x, v in (values or {}).items():  # keyed by the first axis' values, or by variant names
            rows.append({"method": f"{method} (paper)", **({axis: x} if axis else {}),
                         "variant": None if axis else str(x), "mean": float(v), "std": math.nan, "n": 0, "cells": 0,
                         f"{spec.metric}_mean": float(v), f"{spec.metric}_std": math.nan})
    return pd.DataFrame(rows)


def fmt(mean: float, std: float, n: int, reference: bool = False) -> str:
    if reference:
        return f"{mean:.2f}"
    if n == 0 or pd.isna(mean):
        return "—"
    return f"{mean:.2f} ({n})" if n == 1 else f"{mean:.2f} ± {std:.2f} ({n})"


def pivot(summary: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """Rows: method (and variant, and all axes but the first); columns: the first axis. Without
    axes, the columns are the reported results (accuracies, pseudo-label health, minutes)."""
    s = summary.copy()
    s["label"] = s["method"] + s["variant"].map(lambda v: f" [{v}]" if isinstance(v, str) else "")
    axes = list(spec.axes)
    for extra in axes[1:]:
        s["label"] += s[extra].map(lambda v, e=extra: f" {e}={v}")
    s["value"] = [fmt(m, sd, n, n == 0 and "(paper)" in lab)
                  for m, sd, n, lab in zip(s["mean"], s["std"], s["n"], s["label"])]
    if not axes:
        table = pd.DataFrame(index=s["label"])
        for col, title in COLUMNS.items():
            if f"{col}_mean" not in s or not (s[f"{col}_mean"].fillna(0) != 0).any():
                continue  # e.g. no method in the study admits pseudo-labels or has earlier stages
            scale = 100.0 if col in PERCENT else 1.0
            # a paper's row holds the study's metric only; it shows there, plain
            table[title] = [fmt(m, sd, 0, True) if "(paper)" in lab and col == spec.metric and not math.isnan(m)
                            else fmt(scale * m, scale * sd, n if not math.isnan(m) else 0)
                            for m, sd, n, lab in zip(s[f"{col}_mean"], s[f"{col}_std"], s["n"], s["label"])]
        return table
    table = s.pivot_table(index="label", columns=axes[0], values="value", aggfunc="first", sort=False)
    table = table.reindex(columns=sorted(table.columns, key=float))
    return table.fillna("—")


def budget_table(df: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """Per group, labelled as in the results table: what its runs consumed (every seed's is the
    same, so its first finished run's) and, for studies with axes, the minutes they took."""
    rows = []
    for _, g in df.groupby("group", sort=False):
        first, done = g.iloc[0], g.dropna(subset=["run_id"])
        label = first["method"] + (f" [{first['variant']}]" if isinstance(first["variant"], str) else "")
        label += "".join(f" {a}={first[a]}" for a in spec.axes)
        run = done.iloc[0] if len(done) and "steps" in done and pd.notna(done.iloc[0]["steps"]) else None
        row = {"label": label, "start": run["start"] if run is not None and isinstance(run.get("start"), str) else "—",
               "steps (stages + own)": run["steps"] if run is not None else "—"}
        for k in BUDGET:
            row[f"{k.replace('_', ' ')} (k)"] = f"{run[k] / 1e3:,.0f}" if run is not None else "—"
        # what checkpoint selection (and SSMAE's gate) read: at small label budgets, a handful
        val = run.get("val_images") if run is not None else None
        row["validation images"] = f"{int(val):,}" if val is not None and pd.notna(val) else "—"
        row["validation ± (95 %)"] = resolution(done, val)
        if spec.axes:
            minutes, _, n = _stats(done["minutes"]) if "minutes" in done else (math.nan, math.nan, 0)
            stages = _stats(done["stage_minutes"])[0] if "stage_minutes" in done else math.nan
            row["minutes (+ stages)"] = "—" if not n else f"{minutes:.1f}" + (
                f" (+ {stages:.1f})" if stages and not math.isnan(stages) else "")
        rows.append(row)
    return pd.DataFrame(rows).set_index("label") if rows else pd.DataFrame()


def resolution(done: pd.DataFrame, val_images) -> str:
    """The 95 % half-width, in points, of one validation reading at the cell's selected accuracy
    over `val_images` images (binomial, normal approximation): two recipes whose validation
    accuracies differ by less are not told apart by it."""
    if val_images is None or pd.isna(val_images) or not int(val_images) or "selected_val_acc" not in done:
        return "—"
    acc = pd.to_numeric(done["selected_val_acc"], errors="coerce").dropna()
    if not len(acc):
        return "—"
    p = min(max(float(acc.mean()) / 100, 0.0), 1.0)
    return f"{196 * math.sqrt(p * (1 - p) / int(val_images)):.1f}"


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
    return "\n".join([r"% needs \usepackage{booktabs} (\toprule, \midrule, \bottomrule) in the preamble",
                      r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}",
                      r"\begin{tabular}{l" + "c" * len(cols) + "}", r"\toprule",
                      " & ".join([""] + cols) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}",
                      r"\end{table}"]) + "\n"


def report_dir(spec: StudySpec, results_dir: Path, dataset: str, preset: str | None,
               under: Path | None = None) -> Path:
    """`<under>/<study>/<dataset>-<preset>/`, `under` by default `<results_dir>/reports`: every
    study's report keeps a folder of its own."""
    under = under if under is not None else results_dir / "reports"
    return Path(under) / spec.name / f"{dataset}-{Path(preset).stem if preset else 'default'}"


def write_report(spec: StudySpec, study, cells: list[Cell], results_dir: Path, dataset: str,
                 preset: str | None, under: Path | None = None) -> Path:
    """Write runs.csv, summary.csv, table.{csv,md,tex}, budget.csv, differences.csv,
    health.csv, figure.{png,pdf}, curves.{png,pdf}, and runs/: the record of every finished run shown."""
    out = report_dir(spec, results_dir, dataset, preset, under)
    df = collect(spec, study, cells, results_dir)
    summary = summarise(df, spec)
    refs = reference_rows(spec, dataset)
    shown = pd.concat([summary, refs], ignore_index=True) if len(refs) else summary
    table = pivot(shown, spec)
    budget = budget_table(df, spec)
    if not spec.axes and len(budget):  # one row per method / variant: the budget sits beside the results
        table = table.join(budget, how="left").fillna("—")
    diffs = compare.differences(df, spec)
    title = f"{spec.name} on {dataset} ({preset or 'default'} preset): {spec.metric}, mean ± std (n seeds)"
    text = markdown(table, title)
    if spec.budget:
        text += f"\nBudget: {spec.budget}\n"
    if spec.axes and len(budget):
        text += "\n" + markdown(budget, "Budget per cell (steps per stage, images drawn, forward-pass images)")
    health = health_table(df, spec)
    if len(health) and (spec.axes or "gate first opens at step (per seed)" in health):
        text += "\n" + markdown(health, "Pseudo-labels per cell (admission and precision over the last tenth of "
                                         "training; the gate's decisions on validation)")
    if len(diffs):
        text += "\n" + compare.markdown(diffs)
    atomic_write_text(out / "runs.csv", df.to_csv(index=False))
    atomic_write_text(out / "summary.csv", shown.to_csv(index=False))
    atomic_write_text(out / "table.csv", table.to_csv())
    atomic_write_text(out / "budget.csv", budget.to_csv())
    atomic_write_text(out / "health.csv", health.to_csv())
    atomic_write_text(out / "differences.csv", diffs.to_csv(index=False))
    atomic_write_text(out / "table.md", text)
    atomic_write_text(out / "table.tex", latex(table, title))
    from bench.study.figures import curves_figure, study_figure
    study_figure(summary, refs, spec, out / "figure", title)
    curves_figure(df, results_dir, out / "curves", f"{spec.name} on {dataset}: training curves")
    save_records(study, cells, results_dir, out)
    return out


def gate_of(metrics: dict) -> dict[str, float]:
    """A gated run's first open decision (inf: it never opened) and the share of its decisions
    that were open; nothing for a run without a gate."""
    series = metrics.get("gate.open") or {}
    decisions = [v >= 0.5 for v in series.get("values") or []]
    if not decisions:
        return {}
    opened = [s for s, o in zip(series["steps"], decisions) if o]
    out = {"gate_open_step": float(opened[0]) if opened else math.inf,
           "gate_open_share": sum(decisions) / len(decisions)}
    # what each reading rested on: how many confident validation images, and how many were right
    counts = (metrics.get("gate.hc_count") or {}).get("values") or []
    accs = (metrics.get("gate.hc_acc") or {}).get("values") or []
    if counts:
        out["gate_confident"] = float(statistics.median(counts))
    if accs and len(accs) == len(counts) and sum(counts):  # pooled: a reading counts by its images
        out["gate_hc_acc"] = sum(a * n for a, n in zip(accs, counts)) / sum(counts)
    return out


def health_table(df: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """Per group, labelled as in the budget table: pseudo-label admission and precision over the
    last tenth of training (mean over seeds) and, for a gated method, each seed's first open
    gate decision and the share of decisions that were open."""
    rows = []
    gated = "gate_open_step" in df and df["gate_open_step"].notna().any()
    for _, g in df.groupby("group", sort=False):
        first, done = g.iloc[0], g.dropna(subset=["run_id"])
        label = first["method"] + (f" [{first['variant']}]" if isinstance(first["variant"], str) else "")
        label += "".join(f" {a}={first[a]}" for a in spec.axes)
        row = {"label": label}
        for col, title in (("pl_rate", "admission %"), ("pl_precision", "precision %")):
            m, sd, n = _stats(done[col]) if col in done else (math.nan, math.nan, 0)
            row[title] = fmt(100 * m, 100 * sd, n)
        if gated:
            steps = done["gate_open_step"].dropna() if "gate_open_step" in done else pd.Series(dtype=float)
            row["gate first opens at step (per seed)"] = " / ".join(
                "never" if math.isinf(v) else f"{v:,.0f}" for v in steps) or "—"
            share = _stats(done["gate_open_share"])[0] if len(steps) else math.nan
            row["gate open (% of decisions)"] = "—" if math.isnan(share) else f"{100 * share:.0f}"
            for col, title, digits in (("gate_confident", "gate reads: confident images (median, per seed)", 0),
                                       ("gate_hc_acc", "gate reads: their accuracy % (pooled, per seed)", 1)):
                values = done[col].dropna() if col in done else []
                row[title] = " / ".join(f"{v:.{digits}f}" for v in values) or "—"
        rows.append(row)
    return pd.DataFrame(rows).set_index("label") if rows else pd.DataFrame()


def pseudo_label_health(metrics: dict, steps: int | None) -> dict[str, float]:
    """Admission rate and precision (fractions) over the last tenth of a run's steps; NaN where
    the run logged none (a method without pseudo-labels)."""
    return {k: _tail_mean(metrics, name, steps) for k, name in HEALTH.items()}


def _tail_mean(metrics: dict, name: str, steps: int | None) -> float:
    """Mean of a curve over the last tenth of the run's steps (NaN if it has no point there)."""
    series = metrics.get(name) or {}
    points = list(zip(series.get("steps") or [], series.get("values") or []))
    if not points:
        return math.nan
    end = steps or points[-1][0]
    tail = [v for s, v in points if s > 0.9 * end] or [points[-1][1]]
    return float(sum(tail) / len(tail))
