"""Differences between methods, paired by seed, with their uncertainty.

Two seeds cannot carry a claim about a gap of a point: every report gives each group's
difference to the study's reference (a method, e.g. supervised; a variant, e.g. `full`; or one
value of an axis, e.g. the default mask ratio) on the study's metric, paired by seed, with a 95 %
Student-t interval over the paired differences (mean +- t(0.975, n - 1) * sd / sqrt(n)), whether
it excludes zero, and how many seeds a paired t-test needs to detect a difference of the observed
size and spread with 80 % power.

Where a study adds each semi-supervised method's control, every such method is also compared
with its own control (reference `control`): what its pseudo-label term adds, the start and the
extra steps cancelling; where it adds the oracle, the oracle is compared with its method's own
run (reference `variant main`): what the wrong pseudo-labels cost under the same admission mask.
Each comparison carries its paired t-test's p-value and, within its family
(the rows sharing a reference), Holm's adjustment: a table that makes several claims against one
reference makes them at the 5 % level together. The comparison a study declares `primary` before
running is tested alone, outside the correction.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd
from scipy import stats

from bench.study.spec import StudySpec

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


def seeds_needed(mean: float, sd: float, level: float = 0.95, power: float = 0.8) -> int | None:
    """The fewest seeds at which a paired t-test at `level` detects a true difference of `mean`
    with paired spread `sd` with probability `power` (80 %: the usual planning figure; the count
    at which the interval only just excludes zero has about 50 %); None beyond MAX_SEEDS or for
    no difference at all."""
    if mean == 0 or math.isnan(mean):
        return None
    if sd == 0 or math.isnan(sd):
        return 2
    for n in range(2, MAX_SEEDS + 1):
        if paired_power(abs(mean) / sd, n, level) >= power:
            return n
    return None


def paired_power(effect: float, n: int, level: float = 0.95) -> float:
    """Power of a two-sided paired t-test with n pairs at standardised effect mean/sd: the
    noncentral t's mass beyond the critical values."""
    crit = stats.t.ppf(0.5 + level / 2, n - 1)
    shift = effect * math.sqrt(n)
    return float(stats.nct.sf(crit, n - 1, shift) + stats.nct.cdf(-crit, n - 1, shift))


def differences(runs: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """One row per compared group: its paired difference to the reference on `spec.metric`, and
    to its own control where the study has one; with p-values, Holm's within each family, and
    the primary comparison marked."""
    metric = spec.metric
    if metric not in runs or runs[metric].isna().all():
        return pd.DataFrame()
    done = runs.dropna(subset=[metric]).copy()
    done["variant"] = done["variant"].fillna("")
    parts = []
    ref = reference_of(spec)
    if ref is not None:
        parts.append(_against(done, spec, *ref))
    if "control" in spec.references:
        parts.append(_against(done, spec, "variant", "control", only=done["variant"] == ""))
    if "oracle" in spec.references:  # what its wrong pseudo-labels cost a method, under the same admission
        parts.append(_against(done, spec, "variant", "main", only=done["variant"] == "oracle"))
    rows = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame()
    if rows.empty:
        return rows
    rows["primary"] = [is_primary(r, spec) for _, r in rows.iterrows()]
    rows["p_holm"] = float("nan")
    for _, family in rows[~rows["primary"]].groupby("reference", sort=False):
        rows.loc[family.index, "p_holm"] = holm(family["p_value"].tolist())
    rows.loc[rows["primary"], "p_holm"] = rows.loc[rows["primary"], "p_value"]
    return rows


def _against(done: pd.DataFrame, spec: StudySpec, kind: str, name: Any, only: pd.Series | None = None) -> pd.DataFrame:
    """Rows of `done` (those in `only`) against the reference (`kind`, `name`), paired by seed."""
    metric, axes = spec.metric, list(spec.axes)
    # a run's partner: same seed, same axis values, and the same method (comparing variants), the
    # same variant (comparing methods: a reference variant's run pairs with the reference method's
    # main run), or the same method and variant (comparing an axis's values)
    pair = done.copy()
    if kind == "method":
        pair["variant"] = pair["variant"].where(~pair["variant"].isin(list(spec.references)), "")
    if kind in spec.axes:
        pair_on = ["seed", "method", "variant", *(a for a in axes if a != kind)]
    else:
        pair_on = ["seed", *axes] + (["method"] if kind == "variant" else ["variant"])
    is_ref = done[kind] == ("" if (kind, name) == ("variant", "main") else name)  # a method's own run: no variant
    reference = pair[is_ref].set_index(pair_on)[metric]
    if kind == "method":  # the reference method's own cells, not its references'
        reference = pair[is_ref & ~done["variant"].isin(list(spec.references))].set_index(pair_on)[metric]
    chosen = ~is_ref if only is None else (~is_ref & only)
    rows: list[dict[str, Any]] = []
    for group, g in pair[chosen].groupby("group", sort=False):
        diffs = []
        for _, r in g.iterrows():
            key = tuple(r[c] for c in pair_on)
            if key in reference.index:
                diffs.append(float(r[metric]) - float(reference.loc[key]))
        if not diffs:
            continue
        mean, low, high = interval(diffs)
        sd = pd.Series(diffs).std(ddof=1) if len(diffs) > 1 else math.nan
        first = done.loc[g.index[0]]
        rows.append({"group": group, "method": first["method"], **{a: first[a] for a in axes},
                     "variant": first["variant"] or None, "reference": f"{kind} {name}", "metric": metric,
                     "diff": mean, "ci_low": low, "ci_high": high, "n_pairs": len(diffs),
                     "excludes_zero": bool(low > 0 or high < 0) if not math.isnan(low) else False,
                     "p_value": p_value(diffs),
                     "seeds_needed": seeds_needed(mean, sd) if len(diffs) > 1 else None})
    return pd.DataFrame(rows)


def p_value(diffs: list[float]) -> float:
    """Two-sided paired t-test of a zero mean difference (NaN below 2 pairs; 0 for a constant
    nonzero difference, 1 for none at all)."""
    n = len(diffs)
    if n < 2:
        return math.nan
    mean, sd = sum(diffs) / n, pd.Series(diffs).std(ddof=1)
    if sd == 0 or math.isnan(sd):
        return 1.0 if mean == 0 else 0.0
    return float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN, counted out): the
    k-th smallest of m is multiplied by m - k + 1, kept monotone, capped at 1."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m, out, running = len(order), [math.nan] * len(p_values), 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = running
    return out


def is_primary(row: pd.Series, spec: StudySpec) -> bool:
    """Whether a differences row is the study's declared primary comparison."""
    primary = spec.primary or {}
    if not primary or row["method"] != primary.get("method") or row.get("variant"):
        return False
    against = primary.get("against")
    wanted = f"variant {against}" if against in spec.references else f"method {against}"
    if row["reference"] != wanted:
        return False
    return all(str(row.get(axis)) == str(value) for axis, value in primary.items()
               if axis not in ("method", "against"))


def markdown(diffs: pd.DataFrame) -> str:
    if diffs.empty:
        return ""
    metric = diffs["metric"].iloc[0]
    lines = []
    for ref, family in diffs.groupby("reference", sort=False):
        lines += [f"### Differences to {ref} ({metric}, paired by seed, 95 % t-interval)", "",
                  "| | difference | 95 % interval | pairs | excludes 0 | p | p (Holm) | seeds needed |",
                  "|---|---|---|---|---|---|---|---|"]
        for _, r in family.iterrows():
            label = r["group"].replace("|", " ") + (" **(primary)**" if r.get("primary") else "")
            ci = "—" if pd.isna(r["ci_low"]) else f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
            need = "—" if r["n_pairs"] < 2 else (f"{int(r['seeds_needed'])}" if pd.notna(r["seeds_needed"])
                                                   else f"> {MAX_SEEDS}")
            p = lambda v: "—" if pd.isna(v) else f"{v:.3f}"
            lines.append(f"| {label} | {r['diff']:+.2f} | {ci} | {int(r['n_pairs'])} | "
                         f"{'yes' if r['excludes_zero'] else 'no'} | {p(r.get('p_value'))} | {p(r.get('p_holm'))} | "
                         f"{need} |")
        lines.append("")
    lines += ["p: paired t-test; p (Holm): adjusted within the rows of one reference (the primary comparison, "
              "declared before running, is tested alone). Seeds needed: the fewest seeds at which a paired t-test "
              "detects this difference at this spread with 80 % power."]
    return "\n".join(lines) + "\n"
