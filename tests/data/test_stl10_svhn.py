"""STL-10 and SVHN from their official formats (built here), and unlabeled-only images joining
any dataset's unlabeled pool: they never enter a label split, they key the split and the stages,
and pseudo-label precision is measured over the pool images that have labels."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data import sources
from bench.data.sources import load_dataset, make_synthetic
from bench.data.splits import make_split
from bench.data.unlabeled import with_unlabeled
from bench.data.randomness import StepRandom
from bench.method.views import Views
from builders import STL10_CLASSES, build_stl10, build_svhn
from helpers import bench, load_json, run_dirs

TINY = ["--preset", "smoke", "--no-progress", "--steps", "10", "--eval-every", "5", "--ckpt-every", "5",
        "--log-every", "5", "--img-size", "32", "--patch-size", "8"]


def test_stl10_archive_decodes_images_labels_unlabeled_and_folds(tmp_path):
    archive, made = build_stl10(tmp_path)
    d = load_dataset("stl10", archive, tmp_path / "cache", progress=False)
    n = len(made["train_x"])
    assert np.array_equal(d.train_x[:n], made["train_x"]) and np.array_equal(d.train_y[:n], made["train_y"])
    assert np.array_equal(d.train_x[n:], made["unlabeled_x"]) and (d.train_y[n:] == -1).all()
    assert np.array_equal(d.test_x, made["test_x"]) and d.classes == STL10_CLASSES
    assert d.unlabeled_only == len(made["unlabeled_x"]) and len(d.folds) == 10
    assert all(np.array_equal(a, b) for a, b in zip(d.folds, made["folds"]))
    again = load_dataset("stl10", archive, tmp_path / "cache", progress=False)  # from the array cache
    assert again.unlabeled_only == d.unlabeled_only and np.array_equal(again.folds[3], d.folds[3])
    split = make_split(d.train_y, 10, label_fraction=0.5, seed=0)
    assert (d.train_y[split.labeled] >= 0).all() and (d.train_y[split.val] >= 0).all()
    assert set(range(n, len(d.train_y))) <= set(split.unlabeled.tolist())  # every unlabeled-only image is pool


def test_an_stl10_run_on_an_official_fold_trains_on_it(tmp_path):
    archive, made = build_stl10(tmp_path)
    results = tmp_path / "r"
    out = bench(["run", "fixmatch", "--dataset", "stl10", "--data", str(archive), *TINY, "--split-file", "fold:2",
                 "--tau", "0.1", "--val-from", "unlabeled", "--val-per-class", "1", "--results-dir", str(results)],
                tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(results)
    split = load_json(run / "split.json")
    assert sorted(split["labeled"]) == made["folds"][2].tolist()
    assert split["key"]["split_file"]["format"] == "fold"
    assert load_json(run / "config.json")["label_fraction"] == len(made["folds"][2]) / len(made["train_x"])
    metrics = load_json(run / "metrics.json")
    assert "train.pl_covered" in metrics  # precision reads the admitted images that have a label
    bad = bench(["run", "fixmatch", "--dataset", "stl10", "--data", str(archive), *TINY, "--split-file", "fold:10",
                 "--results-dir", str(tmp_path / "r2")], tmp_path / "cache")
    assert bad.returncode == 2 and "fold:0 ... fold:9" in bad.stderr


def test_svhn_reads_the_mat_files_maps_10_to_0_and_takes_extra_on_request(tmp_path):
    made = build_svhn(tmp_path / "svhn")
    d = load_dataset("svhn", tmp_path / "svhn", tmp_path / "cache", progress=False)
    assert np.array_equal(d.train_x, made["train"][0]) and np.array_equal(d.train_y, made["train"][1])
    assert np.array_equal(d.test_y, made["test"][1]) and d.classes == [str(i) for i in range(10)]
    assert 0 in d.train_y and 10 not in d.train_y and not d.hflip
    e = load_dataset("svhn_extra", tmp_path / "svhn", tmp_path / "cache", progress=False)
    assert np.array_equal(e.train_x, np.concatenate([made["train"][0], made["extra"][0]])) and e.hflip is False
    (tmp_path / "svhn" / "test_32x32.mat").unlink()
    with pytest.raises(sources.UsageError, match="test_32x32.mat is missing"):
        load_dataset("svhn", tmp_path / "svhn", tmp_path / "cache2", progress=False)


def test_views_never_mirror_when_the_dataset_forbids_it():
    x = torch.zeros(64, 8, 8, 3, dtype=torch.uint8)
    x[:, :, :4] = 255  # left half white: a mirror puts it on the right
    from bench.data.batch import Images
    for hflip, mirrored in ((True, True), (False, False)):
        random = StepRandom(0, torch.device("cpu"), 0)
        random.begin(0)
        view = Views(8, random, pad_frac=0.0, hflip=hflip).weak(Images.whole(x))
        left, right = view[:, :, :, :4].mean(dim=(1, 2, 3)), view[:, :, :, 4:].mean(dim=(1, 2, 3))
        assert bool((left < right).any()) == mirrored and bool((left > right).any())


def test_downloads_are_checksummed_from_the_mirror(tmp_path, monkeypatch):
    archive, _ = build_stl10(tmp_path)
    monkeypatch.setenv("SSVIT_MIRROR", tmp_path.as_uri())
    with pytest.raises(sources.UsageError, match="checksum mismatch"):
        load_dataset("stl10", None, tmp_path / "cache", progress=False)
    monkeypatch.setattr(sources.stl10, "MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    d = load_dataset("stl10", None, tmp_path / "cache", progress=False)
    assert (tmp_path / "cache" / "downloads" / "stl10_binary.tar.gz").is_file() and d.unlabeled_only == 30


def test_svhn_downloads_each_part_into_the_folder_it_loads(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    made = build_svhn(mirror, {"train": 20, "test": 10})
    monkeypatch.setenv("SSVIT_MIRROR", mirror.as_uri())
    for part in ("train", "test"):  # the official checksums name these files; the built ones differ
        name = f"{part}_32x32.mat"
        monkeypatch.setitem(sources.svhn.FILES, part, (name, hashlib.md5((mirror / name).read_bytes()).hexdigest()))
    d = load_dataset("svhn", None, tmp_path / "cache", progress=False)
    assert np.array_equal(d.train_x, made["train"][0]) and np.array_equal(d.test_y, made["test"][1])
    assert sorted(p.name for p in (tmp_path / "cache" / "downloads" / "svhn").iterdir()) == \
        ["test_32x32.mat", "train_32x32.mat"]


def test_unlabeled_images_join_the_pool_and_key_the_split(tmp_path):
    folder = tmp_path / "extra" / "any" / "depth"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(50, 40), (32, 32), (20, 64)]):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    base = make_synthetic(classes=4, size=32, train_per_class=10, test_per_class=2)
    d = with_unlabeled(base, tmp_path / "extra", tmp_path / "cache", progress=False)
    assert d.train_x.shape == (43, 32, 32, 3) and (d.train_y[40:] == -1).all() and d.unlabeled_only == 3
    assert d.source_hash != base.source_hash
    a, b = make_split(base.train_y, 4, label_fraction=0.3, seed=0, source_hash=base.source_hash), \
        make_split(d.train_y, 4, label_fraction=0.3, seed=0, source_hash=d.source_hash)
    assert np.array_equal(a.labeled, b.labeled) and a.hash != b.hash  # same labels drawn; the pool named
    assert set(b.unlabeled.tolist()) == set(a.unlabeled.tolist()) | {40, 41, 42}


def test_a_run_with_unlabeled_images_records_them_and_refuses_an_oracle(tmp_path):
    folder = tmp_path / "extra"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(folder / f"u{i}.jpg")
    results = tmp_path / "r"
    args = ["run", "fixmatch", "--preset", "smoke", "--no-progress", "--steps", "10", "--eval-every", "5",
            "--tau", "0.1", "--unlabeled-data", str(folder), "--results-dir", str(results)]
    out = bench(args, tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(results)
    split = load_json(run / "split.json")
    n = 10 * 100  # the smoke preset's synthetic training images
    assert {n + i for i in range(6)} <= set(split["unlabeled"]) and max(split["labeled"] + split["val"]) < n
    assert "train.pl_covered" in load_json(run / "metrics.json")
    oracle = bench([*args, "--pl-mode", "oracle"], tmp_path / "cache")
    assert oracle.returncode == 2 and "unlabeled-only" in oracle.stderr
