import numpy as np
import pytest

from bench.errors import UsageError
from bench.data.splits import Split, make_split, split_for

Y = np.repeat(np.arange(10), 50)  # 10 classes x 50 images
RNG = np.random.default_rng(0)
Y_SHUFFLED = RNG.permutation(Y)


def test_split_is_deterministic_and_seed_dependent():
    a = make_split(Y_SHUFFLED, 10, label_fraction=0.2, seed=3)
    b = make_split(Y_SHUFFLED, 10, label_fraction=0.2, seed=3)
    c = make_split(Y_SHUFFLED, 10, label_fraction=0.2, seed=4)
    assert a.hash == b.hash
    assert np.array_equal(a.labeled, b.labeled) and np.array_equal(a.val, b.val)
    assert a.hash != c.hash


def test_split_is_class_balanced_and_disjoint():
    s = make_split(Y_SHUFFLED, 10, label_fraction=0.2, val_fraction=0.2, seed=0)
    # budget 10 per class: 2 validation + 8 labeled-train
    assert np.array_equal(np.bincount(Y_SHUFFLED[s.val], minlength=10), np.full(10, 2))
    assert np.array_equal(np.bincount(Y_SHUFFLED[s.labeled], minlength=10), np.full(10, 8))
    assert not set(s.val) & set(s.labeled)
    # validation never enters the unlabeled pool; labeled images do by default (FixMatch/USB)
    assert not set(s.val) & set(s.unlabeled)
    assert set(s.labeled) <= set(s.unlabeled)
    assert len(s.unlabeled) == len(Y) - len(s.val)


def test_rest_pool_excludes_labeled_and_labels_per_class():
    s = make_split(Y_SHUFFLED, 10, labels_per_class=5, unlabeled_pool="rest", seed=1)
    assert len(s.val) == 10 and len(s.labeled) == 40  # at least one validation image per class
    assert not set(s.unlabeled) & (set(s.labeled) | set(s.val))
    assert len(s.unlabeled) == len(Y) - 50


def test_budget_errors():
    with pytest.raises(UsageError, match="labels-per-class 51 is more than class"):
        make_split(Y, 10, labels_per_class=51)
    with pytest.raises(UsageError, match="validation carved out of it needs 1"):
        make_split(Y, 10, label_fraction=0.01)  # 1 image per class: nothing left for training


def test_manifest_persisted_and_reused(tmp_path):
    cfg = {"label_fraction": 0.2, "labels_per_class": None, "val_fraction": 0.1, "unlabeled_pool": "all", "seed": 7}
    s1 = split_for(cfg, Y_SHUFFLED, 10, "abc", tmp_path)
    files = list((tmp_path / "splits").glob("*.json"))
    assert len(files) == 1
    assert Split.from_json(files[0].read_text()).hash == s1.hash
    s2 = split_for(cfg, Y_SHUFFLED, 10, "abc", tmp_path)
    assert s2.hash == s1.hash
    # a different source is a different manifest
    split_for(cfg, Y_SHUFFLED, 10, "other", tmp_path)
    assert len(list((tmp_path / "splits").glob("*.json"))) == 2


def test_tampered_manifest_is_detected():
    s = make_split(Y_SHUFFLED, 10, label_fraction=0.2)
    text = s.to_json().replace('"labeled": [', '"labeled": [0, ', 1)
    with pytest.raises(ValueError, match="hash"):
        Split.from_json(text)
