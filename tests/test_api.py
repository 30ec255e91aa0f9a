"""The Python API: the command line's validation and defaults, results and report tables as
pandas frames, from one process (as a notebook would)."""
import pytest

from bench import api
from helpers import load_json

SMOKE = dict(preset="smoke", steps=10, eval_every=5, ckpt_every=5, log_every=5)


def test_run_study_and_report_from_python(tmp_path, monkeypatch):
    monkeypatch.setenv("SSVIT_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    done = api.run("supervised", results_dir=results, **SMOKE)
    assert done.result == load_json(done.run_dir / "run.json")["result"]
    assert done.config["steps"] == 10 and done.config["preset"] == "smoke"
    assert {"test_acc", "val_acc"} <= set(done.curves["metric"])
    with pytest.raises(api.UsageError, match="--steps: -1"):
        api.run("supervised", results_dir=results, preset="smoke", steps=-1)
    with pytest.raises(api.UsageError, match="unknown method 'fixmatc'"):
        api.run("fixmatc", results_dir=results)

    study = tmp_path / "pair.yaml"
    study.write_text("description: two methods\nmethods: [supervised, fixmatch]\nseeds: 1\nmetric: test_acc\n"
                     "budget: the same 10 steps\nfixed: {methods: {fixmatch: {tau: 0.3}}}\n")
    report = api.study(str(study), dataset="synthetic", results_dir=results, seeds=1, **SMOKE)
    assert set(report.summary["method"]) == {"supervised", "fixmatch"} and len(report.runs) == 2
    assert "fixmatch" in report.markdown
    again = api.report(str(study), dataset="synthetic", preset="smoke", results_dir=results)
    assert again.summary.equals(report.summary)
    out = api.export(done.run_dir, tmp_path / "exported")
    assert (out / "model.safetensors").is_file()
