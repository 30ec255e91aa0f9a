"""Pseudo-label health while a run trains: the progress bar and the stored metrics show admission
rate, precision, the gate and the memory; a run that has admitted nothing by half its steps says
so once; the gate is read on its own cadence, on validation only."""
import pytest

from helpers import bench, load_json, run_dirs, smoke_trainer


def trainer(method, data, run_dir, **cli):
    logged, warnings = [], []
    t = smoke_trainer(method, data, run_dir, log=lambda k, v, s: logged.append((k, v, s)), warn=warnings.append,
                      **cli)
    return t, logged, warnings


def steps_of(logged, name):
    return [s for k, _, s in logged if k == name]


def test_progress_bar_shows_admission_precision_gate_and_memory(tiny_data, tmp_path, capsys):
    t, _, _ = trainer("ssmae", tiny_data, tmp_path, steps=40, gate_warmup_steps=0, confidence=0.0,
                      gate_threshold=0.0, gate_min_confident=1, eval_every=10, log_every=10)
    t.run(progress=True)
    final = capsys.readouterr().err.split("\r")[-1]
    for field in ("pl=", "prec=", "gate=open", "mem="):
        assert field in final, final


def test_no_admission_by_half_the_run_warns_once_and_is_recorded(tiny_data, tmp_path):
    t, _, warnings = trainer("fixmatch", tiny_data, tmp_path, steps=40, tau=1.0, log_every=5, eval_every=20)
    t.run(progress=False)
    assert len(warnings) == 1 and "no pseudo-label admitted in 20 of 40 steps" in warnings[0]
    admitted, _, quiet = trainer("fixmatch", tiny_data, tmp_path / "b", steps=40, tau=0.0, log_every=5, eval_every=20)
    admitted.run(progress=False)
    assert quiet == []


def test_gate_is_read_on_its_own_cadence_and_test_only_at_evaluations(tiny_data, tmp_path):
    t, logged, _ = trainer("ssmae", tiny_data, tmp_path, steps=40, eval_every=20, gate_every=5, gate_warmup_steps=0,
                           log_every=5)
    t.run(progress=False)
    assert steps_of(logged, "gate.open") == [5, 10, 15, 20, 25, 30, 35, 40]
    assert steps_of(logged, "gate.hc_count") == steps_of(logged, "gate.open")
    assert steps_of(logged, "test_acc") == steps_of(logged, "val_acc") == [20, 40]
    # selection: the evaluation point (and model) with the best validation accuracy, its test accuracy kept
    points = [(v, s, tag) for tag, key in (("raw", "val_acc"), ("ema", "val_acc_ema"))
              for (k, v, s) in logged if k == key]
    best_val, best_step, best_tag = max(points, key=lambda p: (p[0], -p[1], p[2] == "raw"))
    s = t.evaluator.selection
    assert (s.val_acc, s.step, s.model) == (best_val, best_step, best_tag)
    test_key = "test_acc" if best_tag == "raw" else "test_acc_ema"
    assert s.test_acc == next(v for k, v, st in logged if k == test_key and st == best_step)


def test_a_silent_run_warns_on_stderr_and_in_its_record(tmp_path):
    results = tmp_path / "r"
    out = bench(["run", "fixmatch", "--preset", "smoke", "--tau", "1.0", "--steps", "20", "--eval-every", "20",
                 "--log-every", "5", "--results-dir", str(results)], tmp_path / "cache")
    assert out.returncode == 0, out.stderr
    warning = [line for line in out.stderr.replace("\r", "\n").splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "fixmatch: no pseudo-label admitted in 10 of 20 steps" in warning[0]
    (run,) = run_dirs(results)
    assert load_json(run / "info.json")["warnings"] == [warning[0].removeprefix("warning: ")]
    metrics = load_json(run / "metrics.json")
    assert set(metrics["train.pl_rate"]["values"]) == {0.0}
    # the captured output ends with the bar's final state, not a frame from an earlier flush
    assert "20/20" in (run / "cout.txt").read_text().splitlines()[-1]


def test_ssmae_admission_rate_is_averaged_over_the_steps_it_describes(tiny_data, tmp_path):
    """The gate opens at step 10 of a 20-step log window; from then on every scored image is
    admitted (confidence 0), so the window's admission rate is 100 %, not the 50 % an average
    over all of its steps would claim."""
    t, logged, _ = trainer("ssmae", tiny_data, tmp_path, steps=20, log_every=20, eval_every=20, gate_every=10,
                           gate_warmup_steps=10, gate_threshold=0.0, confidence=0.0, agreement=False,
                           memory="rescored")
    t.run(progress=False)
    values = {k: v for k, v, s in logged if s == 20}
    assert values["gate.open"] == 1.0 and values["train.admit_rate"] == 1.0
    assert values["train.pl_rate"] == pytest.approx(0.5)   # labels trained: none before the gate, all after
