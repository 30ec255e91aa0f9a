"""Each method's defining mechanics on a tiny model, and every method end to end on CPU."""
import numpy as np
import pytest
import torch

from bench.mixing import mix, one_hot_smooth, prob_pseudo_mix_lambda
from helpers import bench, load_json, run_dirs, smoke_trainer

SMOKE = ["--dataset", "synthetic", "--preset", "smoke", "--no-progress"]


def test_fixmatch_mask_and_no_gradient_through_pseudo_labels(tiny_data, tmp_path):
    t = smoke_trainer("fixmatch", tiny_data, tmp_path, tau=0.3)
    m = t.method
    x_u = t.train_x[:16]
    x_weak = m.views.weak(x_u)
    pl, logs = m.pseudo_label(x_weak, t.train_y[:16])
    with torch.no_grad():
        t.model.eval()
        reference = t.model(x_weak).softmax(1)
        t.model.train()
    conf = reference.max(1).values
    assert torch.equal(pl.mask, conf >= 0.3)            # mask = confidence >= tau on the weak view
    assert pl.conf.grad_fn is None and not pl.conf.requires_grad  # targets are constants
    loss = m.unlabeled_loss(m.views.strong(x_u), pl)
    loss.backward()
    assert any(p.grad is not None for p in t.model.parameters())
    assert 0 <= float(logs["pl_rate"]) <= 1


def test_semi_mae_branch_sees_the_configured_view(tiny_data, tmp_path):
    t = smoke_trainer("semi_mae", tiny_data, tmp_path, mae_input="weak_all")
    batch = t.next_batch()
    xw, xs = t.views.weak(batch.x_u), t.views.strong(batch.x_u)
    assert t.method.mae_input(batch, xw, xs).shape[0] == len(batch.x_l) + len(batch.x_u)
    t.cfg["mae_input"] = "weak_unlabeled"
    assert t.method.mae_input(batch, xw, xs) is xw
    t.cfg["mae_input"] = "strong"
    assert t.method.mae_input(batch, xw, xs) is xs
    # the configured mask ratio is the one the branch applies
    _, _, mask = t.model.forward_mae(xw, 0.6, t.generator)
    L = mask.shape[1]
    assert torch.all(mask.sum(1) == L - int(L * (1 - 0.6)))


def test_ssmae_gate_opens_on_validation_and_then_admits(tiny_data, tmp_path):
    t = smoke_trainer("ssmae", tiny_data, tmp_path, gate_warmup_steps=0, gate_threshold=0.0, confidence=0.0,
                    agreement=False)
    m = t.method
    assert not m.gate.is_open
    batch = t.next_batch()
    loss, logs = m.train_step(batch)
    assert "admit_rate" not in logs                     # gate closed: no teacher passes, no admission
    assert len(m.memory) == 0
    t.evaluate()                                        # validation high-confidence accuracy >= 0 opens it
    assert m.gate.is_open
    batch = t.next_batch()
    loss, logs = m.train_step(batch)
    assert float(logs["admit_rate"]) == 1.0             # every weak view is confident > 0
    assert len(m.memory) == len(torch.unique(batch.idx_u))


def test_ssmae_steady_state_opens_the_gate_so_speed_times_the_teacher_passes(tiny_data, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode
    t = smoke_trainer("ssmae", tiny_data, tmp_path)

    def step_flops():
        with FlopCounterMode(display=False) as counter:
            t.train_step()
        return counter.get_total_flops()

    closed = step_flops()
    t.method.steady_state()
    assert t.method.gate.is_open
    assert step_flops() > closed  # the no-grad passes on the weak and strong views now run


def test_ssmae_forwards_unlabeled_images_for_its_loss_only_once_the_gate_has_opened(tiny_data, tmp_path):
    t = smoke_trainer("ssmae", tiny_data, tmp_path, gate_warmup_steps=0, gate_threshold=0.0, confidence=0.0)
    m, seen = t.method, []
    t.model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    batch = t.next_batch()
    m.train_step(batch)
    assert seen == [len(batch.x_l)]                    # shut since the start: labeled images only
    t.evaluate()                                       # validation high-confidence accuracy >= 0 opens it
    assert m.gate.is_open and m.gate.has_opened
    m.gate.is_open = False                             # shut again: the memory keeps what it admitted
    seen.clear()
    m.train_step(batch)
    assert seen == [len(batch.x_l) + len(batch.x_u)]


def test_ssmae_training_never_reads_test_labels(tiny_data, tmp_path):
    """Scrambling the test labels changes reported test accuracy only: weights, gate and memory
    are bitwise identical."""
    scrambled = type(tiny_data)(**{**vars(tiny_data), "test_y": np.roll(tiny_data.test_y, 3)})
    states = []
    for d, sub in ((tiny_data, "a"), (scrambled, "b")):
        t = smoke_trainer("ssmae", d, tmp_path / sub, steps=40, gate_warmup_steps=20, gate_threshold=0.0,
                        confidence=0.3)
        t.run(progress=False)
        states.append((t.model.state_dict(), t.method.state_dict()))
    (m1, s1), (m2, s2) = states
    assert all(torch.equal(m1[k], m2[k]) for k in m1)
    assert torch.equal(s1["memory"]["labels"], s2["memory"]["labels"]) and s1["gate"] == s2["gate"]


def test_prob_pseudo_mixup_weight_confidence_and_cutmix_area():
    conf = torch.tensor([0.9, 0.3, 0.6, 0.6])
    perm = torch.tensor([1, 0, 3, 2])
    lam = prob_pseudo_mix_lambda(conf, perm)
    assert torch.allclose(lam, torch.tensor([0.75, 0.25, 0.5, 0.5]))
    assert torch.equal(torch.maximum(conf, conf[perm]), torch.tensor([0.9, 0.9, 0.6, 0.6]))
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    t = one_hot_smooth(torch.tensor([0, 1, 2, 3]), 4, 0.1)
    g = torch.Generator().manual_seed(0)
    xm, tm, lam_c = mix(x, t, lam, perm, torch.tensor([True, True, True, True]), g)
    for i in range(4):
        own = (xm[i] == float(i)).float().mean()        # share of the image that stayed its own
        assert torch.isclose(own, lam_c[i])             # area-corrected lambda
        assert torch.allclose(tm[i], lam_c[i] * t[i] + (1 - lam_c[i]) * t[perm[i]])


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "semi_mae", "ssmae", "mae_finetune", "semi_vit"])
def test_every_method_smoke_run_completes(tmp_path, method):
    results = tmp_path / "r"
    out = bench(["run", method, *SMOKE, "--results-dir", str(results)], tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(results)
    record = load_json(run / "run.json")
    assert record["status"] == "COMPLETED"
    metrics = load_json(run / "metrics.json")
    if method != "supervised" and method != "mae_finetune":
        assert "train.loss_unsup" in metrics or "train.loss_cls" in metrics
        assert "train.pl_rate" in metrics
    if method in ("semi_vit", "mae_finetune"):
        assert "pretrain.train.loss_rec" in metrics
    if method == "ssmae":
        assert metrics["gate.open"]["values"] and metrics["gate.hc_acc"]["values"]


def test_stage_cache_is_reused_when_its_config_is_unchanged(tmp_path):
    results, cache = tmp_path / "r", tmp_path / "cache"
    base = ["run", "mae_finetune", *SMOKE, "--results-dir", str(results)]
    assert bench([*base, "--lr", "0.001"], cache).returncode == 0
    assert bench([*base, "--lr", "0.003"], cache).returncode == 0      # fine-tune knob only
    assert bench([*base, "--pretrain-mask-ratio", "0.5"], cache).returncode == 0
    stages = [load_json(r / "info.json")["stages"]["pretrain"] for r in run_dirs(results)]
    assert [s["reused"] for s in stages] == [False, True, False]
    assert stages[0]["key"] == stages[1]["key"] != stages[2]["key"]
    # the reused run did not train a pretraining stage: no pretrain curves in its metrics
    metrics = [load_json(r / "metrics.json") for r in run_dirs(results)]
    assert "pretrain.train.loss_rec" in metrics[0] and "pretrain.train.loss_rec" not in metrics[1]
