"""Methods from the user's own code: `--plugin` files and modules, and installed packages' entry
points, found by `bench run`, by every `bench study` cell and by `bench tune`; a user's method
that breaks the contract is one line of bad input."""
import hashlib
import sys

import pandas as pd
import pytest

from helpers import REPO, assert_rejected, bench, load_json, run_cli, run_dirs

EXAMPLE = REPO / "examples" / "pseudo_label.py"
SMOKE = ["--preset", "smoke", "--no-progress", "--set", "steps=10", "--set", "eval_every=5",
         "--set", "ckpt_every=5", "--set", "log_every=5", "--set", "tau=0.3"]


def test_a_plugin_method_runs_in_a_study_beside_a_shipped_one(tmp_path):
    study, results = tmp_path / "mine.yaml", tmp_path / "results"
    study.write_text("description: a shipped method\nmethods: [fixmatch]\nseeds: 1\nmetric: test_acc\n"
                     "budget: the same 10 steps\n")
    out = bench(["study", str(study), "--dataset", "synthetic", *SMOKE, "--plugin", str(EXAMPLE),
                 "--methods", "fixmatch", "pseudo_label", "--results-dir", str(results)], tmp_path / "cache",
                cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = pd.read_csv(results / "reports" / "mine" / "synthetic-smoke" / "summary.csv")
    assert set(summary["method"]) == {"fixmatch", "pseudo_label"}
    runs = {load_json(r / "config.json")["method"]: r for r in run_dirs(results)}
    sha = hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    info = load_json(runs["pseudo_label"] / "info.json")
    assert info["plugin"]["sha256"] == sha and info["plugin"]["plugin"] == str(EXAMPLE)
    assert load_json(runs["pseudo_label"] / "config.json")["plugin_sha256"] == sha  # part of the cell's identity
    assert "plugin_sha256" not in load_json(runs["fixmatch"] / "config.json")
    metrics = load_json(runs["pseudo_label"] / "metrics.json")
    assert "train.pl_rate" in metrics and "train.ramp" in metrics  # the engine's logging reached it
    alone = bench(["run", "pseudo_label", "--plugin", str(EXAMPLE), "--preset", "smoke", "--no-progress",
                   "--steps", "10", "--results-dir", str(tmp_path / "alone")], tmp_path / "cache", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert load_json(run_dirs(tmp_path / "alone")[0] / "info.json")["plugin"]["sha256"] == sha


BROKEN = {
    "registers nothing": ("X = 1\n", "registers no method"),
    "takes a shipped name": ("from bench.method import Method, register\n@register('fixmatch')\n"
                             "class M(Method):\n    def train_step(self, batch): ...\n", "already registered"),
    "no train step": ("from bench.method import Method, register\n@register('lazy')\nclass M(Method):\n    pass\n",
                      "has no train_step"),
    "fails to import": ("import numpy\nraise RuntimeError('boom')\n", "importing it failed (RuntimeError: boom)"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_plugin_that_breaks_the_contract_is_one_line(tmp_path, capsys, monkeypatch, case):
    from bench.method.base import REGISTRY, method_names
    method_names()
    text, words = BROKEN[case]
    plugin = tmp_path / f"{case.replace(' ', '_')}.py"
    plugin.write_text(text)
    before = dict(REGISTRY)
    results = tmp_path / "results"
    code, lines, err = run_cli(["run", "supervised", "--plugin", str(plugin), "--preset", "smoke",
                                "--results-dir", str(results)], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, words, results)
    assert REGISTRY == before  # nothing of it stays registered


def test_missing_plugin_and_unknown_method_in_a_study(tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    code, lines, err = run_cli(["run", "supervised", "--plugin", str(tmp_path / "nope.py"), "--results-dir",
                                str(results)], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, "no such file", results)
    code, lines, err = run_cli(["study", "benchmark", "--methods", "fixmatch", "mean_teachr", "--dataset",
                                "synthetic", "--results-dir", str(results)], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, "unknown method 'mean_teachr'", results)


def test_an_installed_package_registers_through_its_entry_point(tmp_path):
    site = tmp_path / "site"
    (site / "my_methods").mkdir(parents=True)
    (site / "my_methods" / "__init__.py").write_text(EXAMPLE.read_text().replace('"pseudo_label"', '"my_pl"'))
    dist = site / "my_methods-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-methods\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ssvit_bench.methods]\nmy_pl = my_methods\n")
    import os
    import subprocess
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "SSVIT_CACHE": str(tmp_path / "c")}
    out = subprocess.run([sys.executable, "-m", "bench.cli", "list"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "my_pl " in out.stdout, out.stderr
