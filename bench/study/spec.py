"""Study specifications: the YAML files under `studies/` and the grid of cells they declare.

A study lists `methods`, `fixed` options, grid `axes` (each with `values` and, where a method
names the knob differently, an `option` per method), or named `variants` (option overrides),
`seeds`, the `metric`, the `figure` to draw and optional paper `reference` values. A cell is
one (method, axis values, variant, seed); every cell is validated by resolving its config
before anything runs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bench.config import resolve, shipped_or_file
from bench.errors import UsageError
from bench.method.base import get_method, method_names

STUDY_DIR = Path(__file__).resolve().parents[2] / "studies"
KEYS = {"description", "methods", "fixed", "axes", "variants", "seeds", "metric", "figure", "datasets",
        "preset", "reference", "budget", "compare_to", "references", "primary"}


def _semi_supervised(method: str) -> bool:
    return get_method(method).pseudo_labels


# The references a study may add beside its cells (`references:`), as variants of the methods
# they apply to: each semi-supervised method's control (the same run, its pseudo-label term off:
# the paired difference is what the term adds) and oracle (true labels under its own admission
# mask: a diagnostic ceiling), and supervised training (from scratch, or mae_finetune's from the
# shared start) on every label: the headroom.
REFERENCES: dict[str, tuple[dict[str, Any], Any]] = {
    "control": ({"pl_mode": "off"}, _semi_supervised),
    "oracle": ({"pl_mode": "oracle"}, _semi_supervised),
    "fully_supervised": ({"label_fraction": 1.0, "labels_per_class": None, "split_file": None, "val_from": "labeled",
                          "val_per_class": None}, lambda method: method in ("supervised", "mae_finetune")),
}
METRICS = ("test_acc", "test_acc_ema", "test_acc_selected", "val_acc", "val_acc_ema", "selected_val_acc")


@dataclass(frozen=True)
class Cell:
    method: str
    axes: tuple[tuple[str, Any], ...]  # (axis name, value) in declaration order
    variant: str | None
    seed: int

    @property
    def key(self) -> str:
        """A stable identifier: the unit of claiming, skipping and reporting."""
        parts = [self.method] + [f"{k}={v}" for k, v in self.axes]
        if self.variant is not None:
            parts.append(f"variant={self.variant}")
        return "|".join(parts + [f"seed={self.seed}"])

    @classmethod
    def parse(cls, key: str) -> "Cell":
        """The cell a key names (the inverse of `key`; values read as YAML, as --values reads them)."""
        method, *parts = key.split("|")
        pairs = [part.partition("=")[::2] for part in parts]
        named = dict(pairs)
        axes = tuple((k, yaml.safe_load(v)) for k, v in pairs if k not in ("variant", "seed"))
        return cls(method, axes, named.get("variant"), int(named["seed"]))

    @property
    def group(self) -> str:
        """The key without the seed: cells of one group are averaged."""
        return self.key.rsplit("|seed=", 1)[0]


@dataclass
class StudySpec:
    name: str
    path: Path
    methods: list[str]
    fixed: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, dict] = field(default_factory=dict)
    variants: dict[str, dict] = field(default_factory=dict)
    seeds: int = 3
    metric: str = "test_acc_ema"
    figure: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] | None = None
    preset: str | None = None
    reference: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    budget: str = ""          # the study's budget policy, one line printed with its report
    compare_to: Any = None    # the paired differences' reference: a method, {variant: name} or {axis: value}
    seed_values: list[int] | None = None  # a cut to these seeds (`--values seed=1`), else 0..seeds-1
    references: dict[str, list[str]] = field(default_factory=dict)  # reference name -> the methods it is added to
    primary: dict[str, Any] = field(default_factory=dict)  # the one comparison declared before running

    skip_main: bool = False  # a cut to some references only (`--variants control`): no main cells

    def cells(self, seeds: int | None = None) -> list[Cell]:
        seeds = self.seeds if seeds is None else seeds
        chosen = range(seeds) if self.seed_values is None else self.seed_values
        grid = list(itertools.product(*[a["values"] for a in self.axes.values()])) or [()]
        out = []
        for m in self.methods:
            variants = ([] if self.skip_main else list(self.variants) or [None]) + [
                r for r, ms in self.references.items() if m in ms]
            out += [Cell(m, tuple(zip(self.axes, values)), v, s) for values in grid for v in variants for s in chosen]
        return out

    def variant_layer(self, name: str) -> dict[str, Any]:
        """The options a variant (or a reference) sets."""
        return dict(REFERENCES[name][0]) if name in self.references else dict(self.variants[name])

    def params(self, cell: Cell, seeds: int) -> dict[str, tuple[Any, Any]]:
        """The cell as Optuna parameters (value, distribution): method, every axis, the variant
        and the seed, so that optuna-dashboard's plots read the grid."""
        from optuna.distributions import CategoricalDistribution, IntDistribution
        out: dict[str, tuple[Any, Any]] = {"method": (cell.method, CategoricalDistribution(self.methods))}
        for axis, value in cell.axes:
            out[axis] = (value, CategoricalDistribution(self.axes[axis]["values"]))
        if cell.variant is not None:
            out["variant"] = (cell.variant, CategoricalDistribution(list(self.variants) + list(self.references)))
        out["seed"] = (cell.seed, IntDistribution(0, max(seeds - 1, cell.seed)))
        return out

    def study_layer(self, cell: Cell) -> dict[str, Any]:
        """The options this cell sets (the `study` layer of the config)."""
        layer = dict(self.fixed)
        for axis, value in cell.axes:
            layer[self.axes[axis].get("option", {}).get(cell.method, axis)] = value
        if cell.variant is not None:
            layer.update(self.variant_layer(cell.variant))
        layer["seed"] = cell.seed
        return layer

    def for_dataset(self, dataset: str) -> "StudySpec":
        """The study on one dataset: an axis whose values are given per dataset takes that
        dataset's (the field's label counts differ between CIFAR-10 and CIFAR-100)."""
        axes = {}
        for axis, spec in self.axes.items():
            values = spec["values"]
            if isinstance(values, dict):
                if dataset not in values:
                    raise UsageError(f"study {self.name}: axis '{axis}' lists values for {', '.join(values)}, not "
                                     f"{dataset}; pick one of those datasets or give --values {axis}=...")
                values = values[dataset]
            axes[axis] = {**spec, "values": list(values)}
        return replace(self, axes=axes)

    def cut(self, methods: list[str] | None = None, values: dict[str, list] | None = None,
            variants: list[str] | None = None) -> "StudySpec":
        """The same study on a sub-grid: some of its methods (or methods it lacks: each adds its
        cells), and for some axes other values (outside the study's own list too: each becomes a
        cell of that axis). Cells keep their
        keys, so a later full run reuses the cells a cut ran."""
        added = []
        for m in methods or []:
            if m not in self.methods:
                get_method(m)  # any registered method (a plugin's too) joins the study; unknown is refused
                added.append(m)
        axes = {k: dict(v) for k, v in self.axes.items()}
        values = dict(values or {})
        seed_values = self.seed_values
        if "seed" in values and "seed" not in axes:  # the seeds to run: e.g. one more seed of a study
            seed_values = values.pop("seed")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seed_values):
                raise UsageError(f"--values seed={','.join(map(str, seed_values))}: seeds are integers >= 0; "
                                 f"e.g. --values seed=0,1")
            seed_values = sorted(set(seed_values))
        for axis, vals in values.items():
            if axis not in axes:
                known = ", ".join(axes) or "none"
                raise UsageError(f"--values {axis}=...: study {self.name} has no axis '{axis}' (its axes: "
                                 f"{known}; and seed); use one of those")
            axes[axis]["values"] = list(vals)
        for v in variants or []:
            if v not in self.variants and v not in self.references and v != "main":
                raise UsageError(f"--variants {v}: not a variant or reference of study {self.name} ("
                                 f"{', '.join([*self.variants, *self.references]) or 'it has none'}; main: "
                                 f"the cells without one); pick among those")
        kept = {k: o for k, o in self.variants.items() if k in variants} if variants else dict(self.variants)
        refs = {k: ms for k, ms in self.references.items() if k in variants} if variants else dict(self.references)
        kept_methods = [m for m in self.methods if m in methods] + added if methods else list(self.methods)
        cut = replace(self, methods=kept_methods,
                      axes=axes, variants=kept, seed_values=seed_values, references=refs)
        if variants and "main" not in variants and not self.variants:
            cut.skip_main = True  # only the references' cells
        return cut

    def with_cut(self, cut: "StudySpec", recorded: list[Cell] = ()) -> "StudySpec":
        """The whole study grown by what a cut of it added (methods, axis values, seeds) and by
        the methods and axis values of `recorded` cells (what earlier cuts added): the grid a
        report shows, so running part of a study never drops the rest from its report."""
        def grown(axis: str, values: list) -> list:
            extra = [*cut.axes[axis]["values"], *(v for c in recorded for k, v in c.axes if k == axis)]
            return [*values, *dict.fromkeys(v for v in extra if v not in values)]
        axes = {k: {**a, "values": grown(k, a["values"])} for k, a in self.axes.items()}
        seeds = None if cut.seed_values is None else sorted(set(range(self.seeds)) | set(cut.seed_values))
        methods = [*self.methods, *(m for m in cut.methods if m not in self.methods)]
        known = method_names() if recorded else []
        methods += [m for m in dict.fromkeys(c.method for c in recorded) if m not in methods and m in known]
        return replace(self, methods=methods, axes=axes, seed_values=seeds)

    def config(self, cell: Cell, dataset: str, preset: str | None, cli: dict[str, Any]) -> dict[str, Any]:
        return resolve(get_method(cell.method), preset=preset,
                       study={**self.study_layer(cell), "dataset": dataset}, cli=cli)


def parse_values(items: list[str]) -> dict[str, list]:
    """`--values AXIS=V1,V2,...` (repeatable) as {axis: [values]}, each value read as YAML."""
    out: dict[str, list] = {}
    for item in items or []:
        axis, sep, text = item.partition("=")
        vals = [v.strip() for v in text.split(",") if v.strip()]
        if not sep or not axis.strip() or not vals:
            raise UsageError(f"--values {item!r}: expected AXIS=V1,V2,..., e.g. --values label_fraction=0.01,0.1")
        parsed = []
        for v in vals:
            try:
                parsed.append(yaml.safe_load(v))
            except yaml.YAMLError:
                parsed.append(v)
        out.setdefault(axis.strip(), []).extend(parsed)
    return out


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml"))


def is_reference(compare_to: Any, methods: list, variants: dict, axes: dict) -> bool:
    """Whether `compare_to` names a method, {variant: NAME} of a variant, or {AXIS: VALUE} with a
    value the axis lists (on any dataset, where it lists them per dataset)."""
    if isinstance(compare_to, str):
        return compare_to in methods
    if not (isinstance(compare_to, dict) and len(compare_to) == 1):
        return False
    (key, value), = compare_to.items()
    if key == "variant":
        return value in variants
    listed = axes[key].get("values", []) if key in axes else []
    return value in ([v for vs in listed.values() for v in vs] if isinstance(listed, dict) else listed)


def load_study(name_or_path: str) -> StudySpec:
    """A shipped study by name, or a study YAML file by path; UsageError on any defect."""
    path = shipped_or_file(STUDY_DIR, name_or_path, "study")
    where = f"study {path}"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise UsageError(f"{where}: not valid YAML{f' (line {line + 1})' if line is not None else ''}; "
                         f"fix the file") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: expected a mapping of {', '.join(sorted(KEYS))}; fix the file")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(KEYS))}")
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise UsageError(f"{where}: 'methods' must be a non-empty list of method names")
    for m in methods:
        get_method(str(m))
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise UsageError(f"{where}: 'axes' must map an axis name to {{values: [...]}}")
    for axis, spec in axes.items():
        values = spec.get("values") if isinstance(spec, dict) else None
        per_dataset = isinstance(values, dict) and values and all(isinstance(v, list) and v for v in values.values())
        if not (isinstance(values, list) and values) and not per_dataset:
            raise UsageError(f"{where}: axis '{axis}' needs a non-empty 'values' list (or one per dataset: "
                             f"{{cifar10: [...], cifar100: [...]}})")
        if not isinstance(spec.get("option", {}), dict):
            raise UsageError(f"{where}: axis '{axis}': 'option' maps a method to its option name")
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise UsageError(f"{where}: 'variants' must map a variant name to option overrides")
    seeds = raw.get("seeds", 3)
    if not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"{where}: 'seeds' must be a positive integer")
    metric = raw.get("metric", "test_acc_ema")
    if metric not in METRICS:
        raise UsageError(f"{where}: metric '{metric}' is not one of {', '.join(METRICS)}")
    if not isinstance(raw.get("fixed", {}) or {}, dict):
        raise UsageError(f"{where}: 'fixed' must map option names to values")
    references = _references(raw.get("references"), [str(m) for m in methods], where)
    if references and variants:
        raise UsageError(f"{where}: 'references' add variants of their own; a study with 'variants' cannot take them")
    primary = raw.get("primary") or {}
    if primary and not (isinstance(primary, dict) and primary.get("method") in methods
                        and primary.get("against") in (*references, *methods)):
        raise UsageError(f"{where}: 'primary' names the one comparison declared before running: {{method: M, "
                         f"against: REFERENCE or METHOD, AXIS: VALUE ...}} with one of the study's methods and "
                         f"references; fix it")
    compare_to = raw.get("compare_to")
    if compare_to is not None and not is_reference(compare_to, methods, variants, axes):
        raise UsageError(f"{where}: 'compare_to' must name one of the study's methods, be {{variant: NAME}} of "
                         f"one of its variants, or {{AXIS: VALUE}} with one of that axis's values")
    return StudySpec(name=path.stem, path=path, methods=[str(m) for m in methods], fixed=raw.get("fixed") or {},
                     axes=axes, variants=variants, seeds=seeds, metric=metric, figure=raw.get("figure") or {},
                     datasets=raw.get("datasets"), preset=raw.get("preset"), reference=raw.get("reference") or {},
                     description=raw.get("description", ""), budget=str(raw.get("budget") or ""),
                     compare_to=compare_to, references=references, primary=primary)


def _references(raw: Any, methods: list[str], where: str) -> dict[str, list[str]]:
    """`references: [control, oracle]` (each added to every method it applies to) or
    `{control: [fixmatch, semi_vit], ...}`, as {reference: [methods]}."""
    if not raw:
        return {}
    wanted = {name: None for name in raw} if isinstance(raw, list) else raw
    if not isinstance(wanted, dict):
        raise UsageError(f"{where}: 'references' lists some of {', '.join(REFERENCES)}, or maps them to methods")
    out = {}
    for name, chosen in wanted.items():
        if name not in REFERENCES:
            raise UsageError(f"{where}: unknown reference '{name}'; use {', '.join(REFERENCES)}")
        applies = REFERENCES[name][1]
        chosen = [m for m in methods if applies(m)] if chosen is None else list(chosen)
        bad = [m for m in chosen if m not in methods or not applies(m)]
        if bad:
            raise UsageError(f"{where}: reference '{name}' cannot be added to {', '.join(map(str, bad))} (not a "
                             f"method of the study, or one it does not apply to)")
        out[name] = chosen
    return out
