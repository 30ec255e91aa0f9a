"""Threshold policies against hand-computed updates, and the engine's pseudo-label switch: a
control draws the same random numbers as its run and trains no pseudo-label; an oracle trains the
true labels under the method's own admission mask, and is never a default."""
import math

import pytest
import torch

from bench.config import resolve
from bench.method.base import get_method, method_names
from bench.method.thresholds import make_policy
from helpers import assert_rejected, run_cli, smoke_trainer


def policy(name, tau=0.9, k=2, pool=4, **cfg):
    return make_policy({"threshold_policy": name, "policy_momentum": 0.5, **cfg}, tau, k, "cpu",
                       pool=torch.arange(pool), index_space=pool)


def P(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_fixed_admits_at_tau():
    pl = policy("fixed")(P([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1]))
    assert pl.mask.tolist() == [True, False] and pl.labels.tolist() == [0, 1]
    assert policy("fixed").state_dict() == {}


def test_distribution_alignment_scales_by_the_running_mean():
    p = policy("align", tau=0.7)
    pl = p(P([[0.8, 0.2], [0.6, 0.4]]), torch.tensor([0, 1]))
    # p_model = 0.5 * [0.5, 0.5] + 0.5 * mean = [0.6, 0.4]; row 1: [0.8 / 0.6, 0.2 / 0.4] / 2, renormalised
    assert p.p_model.tolist() == pytest.approx([0.6, 0.4])
    a, b = 0.8 * 0.5 / 0.6, 0.2 * 0.5 / 0.4
    assert float(pl.conf[0]) == pytest.approx(a / (a + b), abs=1e-5)
    c, d = 0.6 * 0.5 / 0.6, 0.4 * 0.5 / 0.4   # row 2: aligned to [0.5, 0.5]: below 0.7
    assert pl.mask.tolist() == [True, False] and float(pl.conf[1]) == pytest.approx(max(c, d) / (c + d), abs=1e-5)


@pytest.mark.parametrize("warmup, beta0", [(True, 1 / 3), (False, 1.0)])
def test_flexmatch_class_thresholds_follow_the_confident_counts(warmup, beta0):
    p = policy("flexmatch", tau=0.9, flex_warmup=warmup)
    # step 1: no curriculum yet, every threshold 0 (all admitted); image 0 is confident class 0
    pl = p(P([[0.95, 0.05], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]]), torch.tensor([0, 1, 2, 3]))
    assert pl.mask.all()
    assert p.selected.tolist() == [0, -1, -1, -1]
    # counts [1, 0], 3 images unlabeled: beta_0 = 1 / max(1, 3) with the warm-up, 1 / 1 without
    assert p.beta.tolist() == pytest.approx([beta0, 0.0])
    t0 = 0.9 * beta0 / (2 - beta0)
    assert p.class_thresholds().tolist() == pytest.approx([t0, 0.0])
    # step 2 decides with those thresholds, then learns image 3 as a confident class 1
    pl = p(P([[0.6, 0.4], [0.02, 0.98]]), torch.tensor([2, 3]))
    assert pl.mask.tolist() == [0.6 >= t0, True]           # class 0 at its threshold; class 1's is still 0
    assert p.selected.tolist() == [0, -1, -1, 1]
    state = p.state_dict()
    q = policy("flexmatch", tau=0.9, flex_warmup=warmup)
    q.load_state_dict(state)
    assert torch.equal(q.selected, p.selected) and torch.equal(q.beta, p.beta)


def test_freematch_self_adaptive_thresholds():
    p = policy("freematch")
    pl = p(P([[0.8, 0.2], [0.6, 0.4], [0.45, 0.55]]), torch.tensor([0, 1, 2]))
    conf_mean = (0.8 + 0.6 + 0.55) / 3
    time_p = 0.5 * 0.5 + 0.5 * conf_mean                                   # from 1/K
    p_model = [0.5 * 0.5 + 0.5 * (0.8 + 0.6 + 0.45) / 3, 0.5 * 0.5 + 0.5 * (0.2 + 0.4 + 0.55) / 3]
    hist = [0.5 * 0.5 + 0.5 * 2 / 3, 0.5 * 0.5 + 0.5 * 1 / 3]            # argmax: class 0 twice, 1 once
    assert float(p.time_p) == pytest.approx(time_p)
    assert p.p_model.tolist() == pytest.approx(p_model) and p.label_hist.tolist() == pytest.approx(hist)
    cut = [time_p * p_model[c] / max(p_model) for c in (0, 1)]
    assert pl.mask.tolist() == [0.8 >= cut[0], 0.6 >= cut[0], 0.55 >= cut[1]]
    # the fairness term: sum_c P_c log Q_c over the admitted images' strong-view predictions
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5]], requires_grad=True)
    mask = torch.tensor([True, True, False])
    got = p.fairness_loss(logits, mask)
    value = float(got.detach())
    q = torch.softmax(logits.detach()[:2], 1)
    hist_s = torch.tensor([0.5, 0.5])                                       # argmax 0 and 1
    pm = torch.tensor(p_model) / torch.tensor(hist)
    pm = pm / pm.sum()
    qm = q.mean(0) / hist_s
    qm = qm / qm.sum()
    assert value == pytest.approx(float((pm * torch.log(qm + 1e-12)).sum()), abs=1e-6)
    got.backward()
    assert logits.grad[:2].abs().sum() > 0 and logits.grad[2].abs().sum() == 0   # the admitted images only
    assert float(p.fairness_loss(logits, torch.zeros(3, dtype=torch.bool)).detach()) == 0.0


def test_softmatch_weights_are_a_gaussian_below_the_mean():
    p = policy("softmatch", soft_sigmas=2.0)
    pl = p(P([[0.9, 0.1], [0.6, 0.4]]), torch.tensor([0, 1]))
    p_model = [0.625, 0.375]                                   # 0.5 * 0.5 + 0.5 * [0.75, 0.25]
    aligned = []
    for row in ([0.9, 0.1], [0.6, 0.4]):
        s = [row[c] * 0.5 / p_model[c] for c in (0, 1)]
        aligned.append([v / sum(s) for v in s])
    conf = [max(r) for r in aligned]
    mu = 0.5 * 0.5 + 0.5 * sum(conf) / 2
    var = 0.5 * 1.0 + 0.5 * (conf[0] - conf[1]) ** 2 / 2                    # unbiased, two values
    assert float(p.mu) == pytest.approx(mu, abs=1e-5) and float(p.var) == pytest.approx(var, abs=1e-5)
    expected = [1.0 if c >= mu else math.exp(-(c - mu) ** 2 / (2 * var / 4)) for c in conf]
    assert pl.weight.tolist() == pytest.approx(expected, abs=1e-5)
    assert pl.labels.tolist() == [0, 0]      # the raw prediction's class, though alignment tips row 2 to class 1
    assert aligned[1][1] > aligned[1][0]


# -- the engine's switch: control and oracle ---------------------------------------------------
CASES = {"fixmatch": {"tau": 0.3}, "flexmatch": {"tau": 0.3}, "freematch": {}, "semi_mae": {"tau": 0.3},
         "semi_vit": {"tau": 0.3}, "ssmae": {"confidence": 0.3, "gate_threshold": 0.0, "gate_warmup_steps": 0}}


def one_step(method, data, run_dir, **cli):
    t = smoke_trainer(method, data, run_dir, **{**CASES[method], **cli})
    if method == "ssmae":
        t.method.steady_state()  # an open gate: the teacher scores and admits
    t.train_step()
    return t


@pytest.mark.parametrize("method", list(CASES))
def test_a_control_draws_the_same_random_numbers_and_trains_no_pseudo_label(tiny_data, tmp_path, method):
    run, control = (one_step(method, tiny_data, tmp_path / mode, pl_mode=mode) for mode in ("on", "off"))
    # every draw of the step, on the device and on the host, was made in both (the same count and shapes)
    assert torch.equal(run.random.generator.get_state(), control.random.generator.get_state())
    assert run.random.host.bit_generator.state == control.random.host.bit_generator.state
    logged = {k: v for k, v in run.window.take().items()}
    controlled = control.window.take()
    decided = "admit_rate" if method == "ssmae" else "pl_rate"
    # the method's own decision is logged alike (what its teacher would admit) ...
    assert logged[decided] == controlled[decided] > 0
    # ... and none of it trains
    if method == "ssmae":
        assert len(run.method.memory) > 0 and len(control.method.memory) == 0
    else:
        assert logged["loss_unsup"] > 0 and controlled["loss_unsup"] == 0.0


def test_an_oracle_trains_the_true_labels_under_the_methods_own_mask(tiny_data, tmp_path):
    own, oracle = (one_step("ssmae", tiny_data, tmp_path / mode, pl_mode=mode) for mode in ("on", "oracle"))
    admitted = own.method.memory.labels >= 0
    assert torch.equal(admitted, oracle.method.memory.labels >= 0)             # the same admission mask
    truth = torch.from_numpy(tiny_data.train_y)
    assert torch.equal(oracle.method.memory.labels[admitted], truth[admitted])  # the truth under it
    assert not torch.equal(own.method.memory.labels[admitted], truth[admitted])


def test_the_oracle_is_never_a_default_and_bench_tune_refuses_it(tmp_path, capsys, monkeypatch):
    from bench.config import preset_names
    from bench.study.spec import load_study, study_names
    for method in method_names():
        for preset in [None, *preset_names()]:
            cli = {"data": "/data"} if preset and "imagenet" in preset else {}
            assert resolve(get_method(method), preset=preset, cli=cli)["pl_mode"] == "on", (method, preset)
    names = study_names()
    assert {"benchmark", "positive_control"} <= set(names)
    for name in names:
        spec = load_study(name)
        oracle = [c for c in spec.cells() if c.variant == "oracle"]
        assert not oracle or "oracle" in spec.references      # only where a study asks for the reference
    code, lines, err = run_cli(["tune", "fixmatch", "--trials", "1", "--set", "pl_mode=oracle", "--results-dir",
                                str(tmp_path / "r")], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, "--pl-mode on only", tmp_path / "r")


def test_pl_mode_is_refused_for_a_method_without_pseudo_labels(tmp_path, capsys, monkeypatch):
    code, lines, err = run_cli(["run", "supervised", "--preset", "smoke", "--pl-mode", "off", "--results-dir",
                                str(tmp_path / "r")], tmp_path, capsys, monkeypatch)
    assert_rejected(code, lines, err, "supervised has none", tmp_path / "r")
