"""Shared pseudo-labelling mechanics: thresholds, agreement, memory, the validation gate, EMA."""
import torch

from bench.model.ema import EMA
from bench.method.evaluate import Evaluation
from bench.method.pseudo import PseudoLabelMemory, PseudoLabels, ValidationGate, admission_logs, agreeing, threshold


def probs(rows):
    return torch.tensor(rows, dtype=torch.float)


def test_threshold_is_inclusive_for_fixmatch_and_strict_for_ssmae():
    p = probs([[0.95, 0.05], [0.2, 0.8], [0.5, 0.5]])
    assert threshold(p, 0.95).mask.tolist() == [True, False, False]
    assert threshold(p, 0.95, strict=True).mask.tolist() == [False, False, False]
    assert threshold(p, 0.8).labels.tolist()[:2] == [0, 1]


def test_agreement_needs_both_views_confident_and_equal():
    weak = threshold(probs([[0.99, 0.01], [0.99, 0.01], [0.99, 0.01], [0.6, 0.4]]), 0.9, strict=True)
    strong = threshold(probs([[0.98, 0.02], [0.02, 0.98], [0.7, 0.3], [0.99, 0.01]]), 0.9, strict=True)
    assert agreeing(weak, strong).mask.tolist() == [True, False, False, False]


def test_admission_rate_confidence_and_precision_are_pairs_of_counts():
    pl = threshold(probs([[0.99, 0.01], [0.01, 0.99], [0.6, 0.4]]), 0.9)
    logs = admission_logs(pl, torch.tensor([0, 0, 0]))
    assert logs["pl_rate"].tolist() == [2.0, 3.0]           # 2 admitted of 3
    assert logs["pl_precision"].tolist() == [1.0, 2.0]      # 1 correct of 2 admitted
    torch.testing.assert_close(logs["pl_conf"], torch.tensor([0.99 + 0.99 + 0.6, 3.0]))
    recalled = admission_logs(PseudoLabels(torch.tensor([1, 0]), None, torch.tensor([True, False])),
                              torch.tensor([1, 1]), "admit")
    assert set(recalled) == {"admit_rate", "admit_precision"}  # no confidence for recalled labels


def test_memory_permanent_vs_rescored():
    mem = PseudoLabelMemory(6, torch.device("cpu"))
    idx = torch.tensor([1, 3, 5])
    new = mem.admit(idx, torch.tensor([2, 2, 2]), torch.tensor([True, False, True]))
    assert new.tolist() == [True, False, True] and mem.labels.tolist() == [-1, 2, -1, -1, -1, 2]
    # permanent: an admitted label is never revised
    mem.admit(idx, torch.tensor([4, 4, 4]), torch.tensor([True, True, True]))
    assert mem.labels.tolist() == [-1, 2, -1, 4, -1, 2]
    # re-scored: this step's admissions replace the batch's labels, the rest are forgotten
    mem.admit(idx, torch.tensor([0, 0, 0]), torch.tensor([True, False, False]), rescore=True)
    assert mem.labels.tolist() == [-1, 0, -1, -1, -1, -1]
    assert len(mem) == 1
    other = PseudoLabelMemory(6, torch.device("cpu"))
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.labels, mem.labels)


def test_an_image_twice_in_a_batch_takes_its_first_admitted_label():
    for rescore in (False, True):
        mem = PseudoLabelMemory(4, torch.device("cpu"))
        idx = torch.tensor([2, 0, 2, 2, 0])
        new = mem.admit(idx, torch.tensor([1, 3, 5, 0, 2]), torch.tensor([False, True, True, True, True]),
                        rescore=rescore)
        assert mem.labels.tolist() == [3, -1, 5, -1], rescore
        assert new.tolist() == [False, True, True, False, False]


def evaluation(n_correct_confident, n_wrong_confident, n_unsure):
    rows, labels = [], []
    for _ in range(n_correct_confident):
        rows.append([0.99, 0.01]); labels.append(0)
    for _ in range(n_wrong_confident):
        rows.append([0.99, 0.01]); labels.append(1)
    for _ in range(n_unsure):
        rows.append([0.3, 0.7]); labels.append(0)  # wrong, but below the confidence: not counted
    return Evaluation(0.0, probs(rows), torch.tensor(labels))


def test_gate_opens_exactly_at_the_threshold_after_warmup():
    gate = ValidationGate(threshold=70.0, confidence=0.95, warmup_steps=100)
    assert not gate.update(evaluation(7, 3, 5), step=50)        # 70 % but still warming up
    assert gate.last_hc_acc == 70.0
    assert gate.update(evaluation(7, 3, 5), step=100)           # 70 % >= 70 %: open
    assert not gate.update(evaluation(69, 31, 0), step=200)      # 69 %: closes again
    assert gate.update(evaluation(71, 29, 0), step=300)
    assert not gate.update(evaluation(0, 0, 10), step=400)       # nothing confident: 0 %
    assert ValidationGate(70.0, 0.95, 100, always_open=True).is_open


def test_ema_update_rule():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, 0.9 * before + 0.1 * model.weight)
    assert not ema.model.weight.requires_grad


def test_the_ema_holds_and_averages_the_classifier_only():
    from bench.config import resolve
    from bench.method.base import get_method
    from bench.model.vit_mae import build_model
    cfg = resolve(get_method("semi_mae"), preset="smoke")
    model = build_model(cfg, 4, with_decoder=True)
    ema = EMA(model, decay=0.5)
    keys = set(ema.state_dict())
    assert keys == {k for k in model.state_dict() if not k.startswith(("decoder.", "mae_norm."))}
    assert any(k.startswith("decoder.") for k in model.state_dict()) and model.decoder is not None
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    now = model.state_dict()
    for k, v in ema.state_dict().items():  # each tensor against its namesake, not by position
        expected = 0.5 * before[k] + 0.5 * now[k] if v.is_floating_point() else now[k]
        torch.testing.assert_close(v, expected, msg=k)
    ema.load_state_dict(model.state_dict())  # a full model's state: its classifier part loads
    assert torch.equal(ema.model.vit.pos_embed, model.vit.pos_embed)
    x = torch.randn(2, 3, cfg["img_size"], cfg["img_size"])
    torch.testing.assert_close(ema.model(x), model.eval()(x))
