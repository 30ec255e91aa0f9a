"""Differences between methods, paired by seed, with their uncertainty.

Two seeds cannot carry a claim about a gap of a point: every report gives each group's
difference to the study's reference (a method, e.g. supervised; a variant, e.g. `full`; or one
value of an axis, e.g. the default mask ratio) on the study's metric, paired by seed, with a 95 %
Student-t interval over the paired differences (mean +- t(0.975, n - 1) * sd / sqrt(n)), whether
it excludes zero, and how many seeds the observed spread needs for an interval that would.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd
from scipy import stats

from bench.studies import StudySpec

MAX_SEEDS = 100


def reference_of(spec: StudySpec) -> tuple[str, Any] | None:
    """("method", name), ("variant", name) or (axis, value) the study's groups are compared
    with, or None."""
    ref = spec.compare_to
    if isinstance(ref, dict):
        (kind, name), = ref.items()
        return kind, (name if kind in spec.axes else str(name))
    if isinstance(ref, str):
        return "method", ref
    if "supervised" in spec.methods and len(spec.methods) > 1:
        return "method", "supervised"
    if "full" in spec.variants:
        return "variant", "full"
    return None


def interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a t-interval over paired differences (NaN bounds below 2 pairs)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = pd.Series(diffs).std(ddof=1)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def seeds_needed(mean: float, sd: float, level: float = 0.95) -> int | None:
    """The fewest seeds whose t-interval, at the observed mean and spread of the paired
    differences, excludes zero; None beyond MAX_SEEDS (or for no difference at all)."""
    if mean == 0 or math.isnan(mean):
        return None
    if sd == 0 or math.isnan(sd):
        return 2
    for n in range(2, MAX_SEEDS + 1):
        if stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n) < abs(mean):
            return n
    return None


def differences(runs: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """One row per compared group: its paired difference to the reference on `spec.metric`."""
    ref = reference_of(spec)
    metric = spec.metric
    if ref is None or metric not in runs or runs[metric].isna().all():
        return pd.DataFrame()
    kind, name = ref
    done = runs.dropna(subset=[metric]).copy()
    done["variant"] = done["variant"].fillna("")
    axes = list(spec.axes)
    # a run's partner: same seed, same axis values, and the same method (comparing variants), the
    # same variant (comparing methods), or the same method and variant (comparing an axis's values)
    if kind in spec.axes:
        pair_on = ["seed", "method", "variant", *(a for a in axes if a != kind)]
    else:
        pair_on = ["seed", *axes] + (["method"] if kind == "variant" else ["variant"])
    is_ref = done[kind] == name
    reference = done[is_ref].set_index(pair_on)[metric]
    rows: list[dict[str, Any]] = []
    for group, g in done[~is_ref].groupby("group", sort=False):
        diffs = []
        for _, r in g.iterrows():
            key = tuple(r[c] for c in pair_on)
            if key in reference.index:
                diffs.append(float(r[metric]) - float(reference.loc[key]))
        if not diffs:
            continue
        mean, low, high = interval(diffs)
        sd = pd.Series(diffs).std(ddof=1) if len(diffs) > 1 else math.nan
        first = g.iloc[0]
        rows.append({"group": group, "method": first["method"], **{a: first[a] for a in axes},
                     "variant": first["variant"] or None, "reference": f"{kind} {name}", "metric": metric,
                     "diff": mean, "ci_low": low, "ci_high": high, "n_pairs": len(diffs),
                     "excludes_zero": bool(low > 0 or high < 0) if not math.isnan(low) else False,
                     "seeds_needed": seeds_needed(mean, sd) if len(diffs) > 1 else None})
    return pd.DataFrame(rows)


def markdown(diffs: pd.DataFrame) -> str:
    if diffs.empty:
        return ""
    ref, metric = diffs["reference"].iloc[0], diffs["metric"].iloc[0]
    lines = [f"### Differences to {ref} ({metric}, paired by seed, 95 % t-interval)", "",
             "| | difference | 95 % interval | pairs | excludes 0 | seeds needed |", "|---|---|---|---|---|---|"]
    for _, r in diffs.iterrows():
        label = r["group"].replace("|", " ")
        ci = "—" if pd.isna(r["ci_low"]) else f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
        need = "—" if r["n_pairs"] < 2 else (f"{int(r['seeds_needed'])}" if pd.notna(r["seeds_needed"])
                                               else f"> {MAX_SEEDS}")
        lines.append(f"| {label} | {r['diff']:+.2f} | {ci} | {int(r['n_pairs'])} | "
                     f"{'yes' if r['excludes_zero'] else 'no'} | {need} |")
    lines += ["", "Seeds needed: the fewest seeds whose interval, at this difference and spread, would "
              "exclude zero."]
    return "\n".join(lines) + "\n"
