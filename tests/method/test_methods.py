"""Each method's defining mechanics on a tiny model, and every method end to end on CPU."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.method.mixing import mix, one_hot_smooth, prob_pseudo_mix_lambda
from bench.method.pseudo import PseudoLabels
from helpers import bench, load_json, run_dirs, smoke_trainer

SMOKE = ["--dataset", "synthetic", "--preset", "smoke", "--no-progress"]
SEMI_SUPERVISED = ["fixmatch", "flexmatch", "freematch", "semi_mae", "ssmae", "semi_vit"]


def constant_head(model, cls=None, scale=20.0):
    """Make `model` predict class `cls` with confidence ~1 for every image (uniform if None)."""
    head = model.vit.head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        if cls is not None:
            head.bias[cls] = scale


def test_fixmatch_mask_targets_and_loss(tiny_data, tmp_path):
    t = smoke_trainer("fixmatch", tiny_data, tmp_path, tau=0.3)
    m = t.method
    batch, _ = t.next_batch()
    x_weak = m.views.weak(batch.u)
    pl = m.pseudo_label(m.teacher_probs(x_weak), batch.idx_u)
    with torch.no_grad():
        t.model.eval()
        reference = t.model(x_weak).softmax(1)
        t.model.train()
    conf, labels = reference.max(1)
    assert torch.equal(pl.mask, conf >= 0.3) and torch.equal(pl.labels, labels)  # the weak view decides
    assert pl.conf.grad_fn is None and not pl.conf.requires_grad  # targets are constants
    x_strong = m.views.strong(batch.u)
    loss = m.hard_pseudo_label_loss(x_strong, pl)
    with torch.no_grad():
        ce = F.cross_entropy(t.model(x_strong), labels, reduction="none")
    torch.testing.assert_close(loss, (ce * pl.mask).sum() / len(ce))  # averaged over ALL unlabeled images
    none = PseudoLabels(labels, conf, torch.zeros_like(pl.mask))
    t.model.zero_grad()
    m.hard_pseudo_label_loss(x_strong, none).backward()
    assert all(p.grad is None or not p.grad.any() for p in t.model.parameters())  # nothing admitted, no signal


def test_semi_mae_branch_sees_the_configured_view(tiny_data, tmp_path):
    t = smoke_trainer("semi_mae", tiny_data, tmp_path, mae_input="weak_all")
    batch, _ = t.next_batch()
    xw, xs = t.views.weak(batch.u), t.views.strong(batch.u)
    x, images = t.method.mae_input(batch, xw, xs)
    assert x.shape[0] == len(images) == len(batch.l) + len(batch.u)
    assert torch.equal(images.rows, torch.arange(len(images)))  # labeled rows, then unlabeled rows
    t.cfg["mae_input"] = "weak_unlabeled"
    assert t.method.mae_input(batch, xw, xs) == (xw, batch.u)
    t.cfg["mae_input"] = "strong"
    assert t.method.mae_input(batch, xw, xs)[0] is xs


def test_ssmae_gate_opens_on_validation_and_then_admits(tiny_data, tmp_path):
    t = smoke_trainer("ssmae", tiny_data, tmp_path, gate_warmup_steps=0, gate_threshold=0.0, confidence=0.0,
                      agreement=False)
    m = t.method
    assert not m.gate.is_open
    batch, _ = t.next_batch()
    m.train_step(batch)
    reported = m.take_pseudo_labels()
    assert "admit" not in reported and not reported["pl"].mask.any()  # gate closed: no teacher passes
    assert len(m.memory) == 0
    t.evaluator.evaluate()                                        # validation high-confidence accuracy >= 0 opens it
    assert m.gate.is_open
    batch, _ = t.next_batch()
    m.train_step(batch)
    reported = m.take_pseudo_labels()
    assert reported["admit"].mask.all()                 # every weak view is confident > 0
    assert reported["pl"].mask.all()                    # and each trains this very step
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
    batch, _ = t.next_batch()
    m.train_step(batch)
    assert seen == [len(batch.l)]                      # shut since the start: labeled images only
    t.evaluator.evaluate()                                       # validation high-confidence accuracy >= 0 opens it
    assert m.gate.is_open and m.gate.has_opened
    m.train_step(batch)                                # open: confidence 0 admits every image
    m.gate.is_open = False                             # shut again: the memory keeps what it admitted
    seen.clear()
    logits = []
    t.model.register_forward_hook(lambda module, args, out: logits.append(out.detach().float()))
    _, logs = m.train_step(batch)
    assert seen == [len(batch.l) + len(batch.u)]
    # the labeled loss is logged apart from the joint CE, which also holds the admitted images
    labeled = F.cross_entropy(logits[0][: len(batch.l)], batch.y_l)
    torch.testing.assert_close(logs["loss_sup"], labeled)
    assert (m.memory.lookup(batch.idx_u) >= 0).any() and not torch.isclose(logs["loss_cls"], labeled)


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


LOW_THRESHOLDS = {"fixmatch": {"tau": 0.3}, "semi_mae": {"tau": 0.3}, "semi_vit": {"tau": 0.3}, "flexmatch": {"tau": 0.3},
                  "freematch": {},
                  "ssmae": {"confidence": 0.3, "gate_threshold": 0.0, "gate_warmup_steps": 5, "gate_every": 5}}


@pytest.mark.parametrize("method", SEMI_SUPERVISED)
def test_no_method_reads_the_unlabeled_pools_labels(tiny_data, tmp_path, method):
    """Scrambling the true labels of the unlabeled pool (outside the labeled and validation
    splits) changes the logged precision of the pseudo-labels, which the engine measures, and
    nothing a method trains: the weights stay bitwise equal."""
    probe = smoke_trainer(method, tiny_data, tmp_path / "probe")
    pool_only = np.setdiff1d(probe.split.unlabeled, probe.split.labeled)
    y = tiny_data.train_y.copy()
    y[pool_only] = (y[pool_only] + 1) % tiny_data.num_classes
    scrambled = type(tiny_data)(**{**vars(tiny_data), "train_y": y})
    runs = []
    for d, sub in ((tiny_data, "a"), (scrambled, "b")):
        logged = []
        t = smoke_trainer(method, d, tmp_path / sub, split=probe.split, steps=30, log_every=10, eval_every=30,
                          ckpt_every=30, log=lambda k, v, s: logged.append((k, v)), **LOW_THRESHOLDS[method])
        t.run(progress=False)
        runs.append((t.model.state_dict(), [v for k, v in logged if k == "train.pl_precision"]))
    (w1, p1), (w2, p2) = runs
    assert p1 and p1 != p2, "scrambling the pool's labels must show in the precision the engine logs"
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_semi_vit_takes_pseudo_labels_from_its_ema_teacher(tiny_data, tmp_path):
    """The EMA teacher labels the weak views: with a teacher sure of class 2 and a student that
    knows nothing, every image is admitted and trained towards class 2 (uniform student logits
    give CE log K against any target); with the online teacher nothing passes tau."""
    k = tiny_data.num_classes
    for teacher, admitted in (("ema", 1.0), ("online", 0.0)):
        t = smoke_trainer("semi_vit", tiny_data, tmp_path / teacher, teacher=teacher, tau=0.5, lambda_u=5.0)
        constant_head(t.model)
        constant_head(t.ema.model, cls=2)
        loss, logs = t.method.train_step(t.next_batch()[0])
        pl = t.method.take_pseudo_labels()["pl"]
        assert float(pl.mask.float().mean()) == admitted, teacher
        if admitted:
            assert (pl.labels == 2).all()
        assert float(logs["mix_keep_rate"]) == admitted
        torch.testing.assert_close(logs["loss_unsup"], torch.tensor(admitted * math.log(k)))
        torch.testing.assert_close(loss.detach(), logs["loss_sup"] + 5.0 * logs["loss_unsup"])


def test_semi_vit_keeps_a_mixed_image_when_either_partner_is_confident(tiny_data, tmp_path):
    t = smoke_trainer("semi_vit", tiny_data, tmp_path, tau=0.5)
    constant_head(t.model)  # uniform student: the loss of a kept image is exactly log K
    batch, _ = t.next_batch()
    n = len(batch.u)
    conf = torch.linspace(0.05, 0.95, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    pl = PseudoLabels(torch.zeros(n, dtype=torch.long), conf, conf >= 0.5)
    x_strong = t.views.strong(batch.u)
    t.random.begin(5)
    perm = t.random.on(batch.u).partners()           # the partners the loss draws first at step 5
    t.random.begin(5)
    loss, kept = t.method.pseudo_mixup_loss(batch, x_strong, pl)
    expected = (torch.maximum(conf, conf[perm]) >= 0.5).float()
    assert 0 < float(expected.mean()) < 1
    torch.testing.assert_close(kept, expected.mean())
    torch.testing.assert_close(loss, expected.mean() * math.log(tiny_data.num_classes))


def test_prob_pseudo_mixup_weight_and_cutmix_area():
    conf = torch.tensor([0.9, 0.3, 0.6, 0.6])
    perm = torch.tensor([1, 0, 3, 2])
    lam = prob_pseudo_mix_lambda(conf, conf[perm])
    assert torch.allclose(lam, torch.tensor([0.75, 0.25, 0.5, 0.5]))
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    t = one_hot_smooth(torch.tensor([0, 1, 2, 3]), 4, 0.1)
    from bench.data.randomness import StepRandom
    xm, tm, lam_c = mix(x, t, lam, x[perm], t[perm], torch.tensor([True, True, True, True]), StepRandom(0).on(x))
    for i in range(4):
        own = (xm[i] == float(i)).float().mean()        # share of the image that stayed its own
        assert torch.isclose(own, lam_c[i])             # area-corrected lambda
        assert torch.allclose(tm[i], lam_c[i] * t[i] + (1 - lam_c[i]) * t[perm[i]])


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "semi_mae", "ssmae", "mae_pretrain"])
def test_forward_images_are_counted_as_each_method_spends_them(tiny_data, tmp_path, method):
    """Budget: per step, B labeled and muB unlabeled images are drawn, and encoder passes are
    counted in image equivalents (a masked pass: its visible share, prefix token included)."""
    t = smoke_trainer(method, tiny_data, tmp_path)
    B, U, L = t.n_labeled, t.n_unlabeled, t.model.num_patches
    masked = (int(L * (1 - t.cfg.get("mask_ratio", 0.75))) + 1) / (L + 1)
    per_step = {"supervised": B, "fixmatch": B + 2 * U, "semi_mae": B + 2 * U + U * masked,
                "ssmae": B + (B + U) * masked,       # gate shut: the labeled CE and the MAE pass
                "mae_pretrain": U * masked}[method]
    for _ in range(3):
        t.train_step()
    budget = t.budget()
    assert (budget["steps"], budget["labeled_images"], budget["unlabeled_images"]) == (3, 3 * B, 3 * U)
    assert budget["forward_images"] == round(3 * per_step)
    t.evaluator.evaluate()                                      # evaluation is not training compute
    assert t.budget()["forward_images"] == round(3 * per_step)


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "flexmatch", "freematch", "semi_mae", "ssmae",
                                    "mae_finetune", "semi_vit"])
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
