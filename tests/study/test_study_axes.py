"""Every shipped study's axes and variants act: the value a cell sets reaches the config of the
run that executes it (through the same `--study-layer` the study's workers pass to `bench run`),
and where an axis is a mechanism, the run behaves differently (a higher mask ratio masks more
patches, a higher gate threshold opens the gate later, a larger label fraction labels more)."""
import json
import math
import statistics

import pytest
import yaml

from bench.study.report import gate_of
from bench.study.spec import load_study, study_names
from helpers import smoke_trainer


def resolved(cell, spec, dataset, tmp_path, capsys, monkeypatch):
    from bench.cli import main
    layer = {**spec.study_layer(cell), "dataset": dataset}
    monkeypatch.setenv("SSVIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    data = ["--data", str(tmp_path / "ILSVRC2012")] if dataset == "imagenet" else []  # resolving reads no image
    assert main(["run", cell.method, "--study-layer", json.dumps(layer), "--preset", "smoke", *data,
                 "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def cases():
    for name in study_names():
        spec = load_study(name)
        dataset = (spec.datasets or ["cifar10"])[0]
        yield pytest.param(name, dataset, id=name)


@pytest.mark.parametrize("name, dataset", list(cases()))
def test_each_axis_value_and_variant_reaches_the_run(name, dataset, tmp_path, capsys, monkeypatch):
    spec = load_study(name).for_dataset(dataset)
    cells = spec.cells(1)
    checked = 0
    for method in spec.methods:
        mine = [c for c in cells if c.method == method]
        for axis, axis_spec in spec.axes.items():
            option = axis_spec.get("option", {}).get(method, axis)
            seen = {}
            for c in mine:
                value = dict(c.axes)[axis]
                cfg = resolved(c, spec, dataset, tmp_path, capsys, monkeypatch)
                seen.setdefault(value, cfg[option])
            assert set(seen) == set(axis_spec["values"]), (method, axis)  # every value is a cell of its own
            for value, got in seen.items():
                assert got == pytest.approx(value), (method, axis, value)
            checked += 1
        for variant, overrides in spec.variants.items():
            (c,) = [c for c in mine if c.variant == variant and c.axes == mine[0].axes]
            cfg = resolved(c, spec, dataset, tmp_path, capsys, monkeypatch)
            own = {k: v for k, v in overrides.items() if k != "methods"}
            own.update(overrides.get("methods", {}).get(method, {}))  # a variant's per-method overrides
            for option, value in own.items():
                assert cfg[option] == value, (method, variant, option)
            checked += 1
    assert checked or not (spec.axes or spec.variants)


def first_open(tiny_data, tmp_path, threshold):
    """The first step at which SSMAE's gate reads open, from the run's own logged metrics."""
    logged = []
    t = smoke_trainer("ssmae", tiny_data, tmp_path, steps=60, gate_every=5, eval_every=30, gate_warmup_steps=5,
                      gate_threshold=threshold, confidence=0.3, gate_min_confident=1,
                      log=lambda k, v, step: logged.append((k, v, step)))
    t.run(progress=False)
    first = next((step for k, v, step in logged if k == "gate.open" and v == 1.0), None)
    # the report reads the same step from the run's curves (metrics.json's layout)
    series = {name: [(step, v) for k, v, step in logged if k == name] for name in ("gate.open", "gate.hc_count", "gate.hc_acc")}
    decisions, counts, accs = (series[n] for n in ("gate.open", "gate.hc_count", "gate.hc_acc"))
    gate = gate_of({n: {"steps": [s for s, _ in p], "values": [v for _, v in p]} for n, p in series.items()})
    assert gate["gate_open_step"] == (first if first is not None else math.inf)
    assert gate["gate_open_share"] == pytest.approx(sum(v for _, v in decisions) / len(decisions))
    # what the readings rested on: as many readings of each, the median count, the pooled accuracy
    assert len(counts) == len(accs) == len(decisions)
    assert gate["gate_confident"] == statistics.median(v for _, v in counts)
    pooled = sum(a * n for (_, a), (_, n) in zip(accs, counts)) / sum(n for _, n in counts)
    assert gate["gate_hc_acc"] == pytest.approx(pooled)
    return first


def test_a_higher_gate_threshold_opens_the_gate_later(tiny_data, tmp_path):
    low, high = first_open(tiny_data, tmp_path / "low", 0.0), first_open(tiny_data, tmp_path / "high", 100.0)
    assert low == 5 and (high is None or high > low)


@pytest.mark.parametrize("method", ["semi_mae", "ssmae", "mae_pretrain"])
def test_a_higher_mask_ratio_masks_more_patches(tiny_data, tmp_path, method):
    """Fewer visible patches reach the encoder: the run's own forward-pass count falls."""
    spent = []
    for ratio in (0.5, 0.9):
        t = smoke_trainer(method, tiny_data, tmp_path / str(ratio), mask_ratio=ratio)
        t.train_step()
        spent.append(t.budget()["forward_images"])
    assert spent[0] > spent[1]


def test_a_larger_label_fraction_labels_more_images(tiny_data, tmp_path):
    """The split a run trains on follows the axis (and labels_per_class, the standard counts')."""
    from bench.config import resolve
    from bench.method.base import get_method
    from bench.data.splits import split_for

    def labeled(**cli):
        cfg = resolve(get_method("fixmatch"), preset="smoke", cli=cli)
        return len(split_for(cfg, tiny_data.train_y, tiny_data.num_classes, tiny_data.source_hash, tmp_path).labeled)
    assert labeled(label_fraction=0.1) < labeled(label_fraction=0.4)
    assert labeled(labels_per_class=4) == 4 * (4 - 1)   # one of each class's 4 is held out for validation
