"""Loading: official CIFAR archives built here in the official format, image folders as folders
and tarballs, the uint8 cache, downloads with checksums, synthetic data, and bad input."""
import dataclasses
import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from bench.data import sources as datamod
from bench.data.dataset import CIFAR10_CLASSES
from bench.data.sources import fetch, load_dataset, make_synthetic
from bench.errors import UsageError
from builders import build_cifar10, build_cifar100, rows_to_images, write_image_folder
from helpers import SHARED_CIFAR10


def test_cifar10_archive_and_extracted_folder(tmp_path):
    archive, members = build_cifar10(tmp_path)
    d = load_dataset("cifar10", archive, tmp_path / "cache", progress=False)
    train = [members[f"data_batch_{i}"] for i in range(1, 6)]
    assert np.array_equal(d.train_x, rows_to_images(np.concatenate([b[b"data"] for b in train])))
    assert d.train_y.tolist() == sum((b[b"labels"] for b in train), [])
    assert np.array_equal(d.test_x, rows_to_images(members["test_batch"][b"data"]))
    assert d.classes == list(CIFAR10_CLASSES) and d.num_classes == 10 and d.train_x.dtype == np.uint8
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    folder = load_dataset("cifar10", tmp_path / "x", tmp_path / "cache2", progress=False)
    assert np.array_equal(folder.train_x, d.train_x) and np.array_equal(folder.test_y, d.test_y)


def test_a_given_archive_is_checked_against_the_official_md5(tmp_path, monkeypatch):
    archive, _ = build_cifar10(tmp_path)  # official name, other bytes
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    d = load_dataset("cifar10", archive, tmp_path / "cache", progress=False)
    assert d.checksum == {"file": "cifar-10-python.tar.gz", "md5": md5,
                          "official_md5": datamod.CIFAR["cifar10"].md5, "official": False}
    again = load_dataset("cifar10", archive, tmp_path / "cache", progress=False)  # from the array cache
    assert again.checksum == d.checksum
    monkeypatch.setitem(datamod.CIFAR, "cifar10", dataclasses.replace(datamod.CIFAR["cifar10"], md5=md5))
    assert load_dataset("cifar10", archive, tmp_path / "cache", progress=False).checksum["official"]
    renamed = archive.rename(tmp_path / "mine.tar.gz")
    assert load_dataset("cifar10", renamed, tmp_path / "cache", progress=False).checksum is None


def test_cifar100_archive_uses_fine_labels_and_names(tmp_path):
    archive, members, names = build_cifar100(tmp_path)
    d = load_dataset("cifar100", archive, tmp_path / "cache", progress=False)
    assert d.num_classes == 100 and d.classes == names
    assert d.train_y.tolist() == members["train"][b"fine_labels"]
    assert np.array_equal(d.test_x, rows_to_images(members["test"][b"data"]))


def test_truncated_and_incomplete_archives_are_rejected(tmp_path):
    archive, _ = build_cifar10(tmp_path)
    raw = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UsageError, match="corrupt or truncated|not a readable tar"):
        load_dataset("cifar10", cut, tmp_path / "cache", progress=False)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive at all" * 10)
    with pytest.raises(UsageError, match="not a readable tar archive"):
        load_dataset("cifar10", junk, tmp_path / "cache", progress=False)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    (tmp_path / "x" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UsageError, match="data_batch_3 is missing"):
        load_dataset("cifar10", tmp_path / "x", tmp_path / "cache", progress=False)
    with pytest.raises(UsageError, match="no such file"):
        load_dataset("cifar10", tmp_path / "nowhere.tar.gz", tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("arrays/*.npz"))  # nothing cached from bad input


def test_image_folder_directory_and_tarballs_agree(tmp_path):
    expected = write_image_folder(tmp_path / "imgs")
    d = load_dataset("imagefolder", tmp_path / "imgs", tmp_path / "c1", progress=False)
    assert d.classes == ["a_cls", "b_cls", "c_cls"]  # sorted class folders
    assert d.train_x.shape == (12, 8, 8, 3) and d.test_x.shape == (6, 8, 8, 3)
    assert np.array_equal(d.train_x[0], expected[("train", "a_cls", 0)]) and d.train_y[0] == 0
    assert np.array_equal(d.test_x[-1], expected[("test", "c_cls", 1)]) and d.test_y[-1] == 2
    for mode, suffix in (("w", ".tar"), ("w:gz", ".tar.gz")):
        tarball = tmp_path / f"imgs{suffix}"
        with tarfile.open(tarball, mode) as tar:  # members in reverse order: order must not matter
            for p in sorted((tmp_path / "imgs").rglob("*.png"), reverse=True):
                tar.add(p, arcname=str(p.relative_to(tmp_path / "imgs")))
        t = load_dataset("imagefolder", tarball, tmp_path / f"c{suffix}", progress=False)
        assert np.array_equal(t.train_x, d.train_x) and np.array_equal(t.test_y, d.test_y)


def test_cifar10_image_folder_uses_official_class_order(tmp_path):
    write_image_folder(tmp_path / "imgs", classes=CIFAR10_CLASSES[::-1], per_class=(1, 1))
    d = load_dataset("cifar10", tmp_path / "imgs", tmp_path / "c", progress=False)
    assert d.classes == list(CIFAR10_CLASSES)
    write_image_folder(tmp_path / "other", classes=("cat", "dog"), per_class=(1, 1))
    with pytest.raises(UsageError, match="do not match cifar10's classes.*--dataset imagefolder"):
        load_dataset("cifar10", tmp_path / "other", tmp_path / "c", progress=False)


def test_bad_image_folders(tmp_path):
    write_image_folder(tmp_path / "trunc")
    victim = tmp_path / "trunc" / "train" / "b_cls" / "001.png"
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(jpeg, format="JPEG")
    victim.with_suffix(".jpg").write_bytes(jpeg.getvalue()[:60])  # a truncated JPEG
    with pytest.raises(UsageError, match="b_cls/001.jpg: cannot decode"):
        load_dataset("imagefolder", tmp_path / "trunc", tmp_path / "c", progress=False)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UsageError, match="no images under train/<class>/"):
        load_dataset("imagefolder", tmp_path / "empty", tmp_path / "c", progress=False)
    with pytest.raises(UsageError, match="needs --data"):
        load_dataset("imagefolder", None, tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").glob("arrays/*.npz"))


def test_decoded_arrays_are_cached_by_content(tmp_path):
    write_image_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", tmp_path / "imgs", cache, progress=False)
    (npz,) = cache.glob("arrays/imagefolder-*.npz")
    assert first.source_hash[:16] in npz.name
    # the second load reads the cache file, not the images: plant a marker in the cache
    with np.load(npz) as z:
        arrays = dict(z)
    arrays["train_x"] = np.full_like(arrays["train_x"], 7)
    np.savez(npz, **arrays)
    again = load_dataset("imagefolder", tmp_path / "imgs", cache, progress=False)
    assert (again.train_x == 7).all() and again.source_hash == first.source_hash
    # a changed source has a new hash and is decoded afresh
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "train" / "a_cls" / "000.png")
    changed = load_dataset("imagefolder", tmp_path / "imgs", cache, progress=False)
    assert changed.source_hash != first.source_hash and not (changed.train_x == 7).all()
    assert len(list(cache.glob("arrays/*.npz"))) == 2


def test_fetch_verifies_the_checksum(tmp_path):
    archive, _ = build_cifar10(tmp_path)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "dl" / "cifar-10-python.tar.gz"
    fetch(archive.as_uri(), dest, md5, progress=False)
    assert dest.read_bytes() == archive.read_bytes()
    bad = tmp_path / "dl2" / "x.tar.gz"
    with pytest.raises(UsageError, match="checksum mismatch"):
        fetch(archive.as_uri(), bad, "0" * 32, progress=False)
    assert not bad.exists() and not list(bad.parent.glob("*"))  # no partial file left


def test_offline_cifar_without_data_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SSVIT_MIRROR", (tmp_path / "no-mirror").as_uri())
    with pytest.raises(UsageError, match="cannot download .*cifar-100-python.tar.gz.*--data"):
        load_dataset("cifar100", None, tmp_path / "cache", progress=False)
    # a mirror serving a file with the wrong checksum (not the official archive) is refused
    build_cifar10(tmp_path)
    monkeypatch.setenv("SSVIT_MIRROR", tmp_path.as_uri())
    with pytest.raises(UsageError, match="checksum mismatch"):
        load_dataset("cifar10", None, tmp_path / "cache", progress=False)


def test_synthetic_is_deterministic_balanced_and_seeded():
    a, b = make_synthetic(4, 16, 10, 5, seed=1), make_synthetic(4, 16, 10, 5, seed=1)
    assert np.array_equal(a.train_x, b.train_x) and a.source_hash == b.source_hash
    c = make_synthetic(4, 16, 10, 5, seed=2)
    assert not np.array_equal(a.train_x, c.train_x) and a.source_hash != c.source_hash
    assert a.train_x.shape == (40, 16, 16, 3) and a.test_x.shape == (20, 16, 16, 3)
    assert np.bincount(a.train_y).tolist() == [10] * 4
    # class-conditional: images are closer to their class mean than to other classes' means
    means = np.stack([a.train_x[a.train_y == k].astype(float).mean(0) for k in range(4)])
    dist = ((a.test_x[:, None].astype(float) - means[None]) ** 2).sum((2, 3, 4))
    assert (dist.argmin(1) == a.test_y).mean() > 0.9


@pytest.mark.skipif(not SHARED_CIFAR10.exists(), reason="real CIFAR-10 copy not present")
def test_real_cifar10_copy(real_cache):
    d = load_dataset("cifar10", SHARED_CIFAR10, real_cache, progress=False)
    assert d.train_x.shape == (50000, 32, 32, 3) and d.test_x.shape == (10000, 32, 32, 3)
    assert np.bincount(d.train_y).tolist() == [5000] * 10 and np.bincount(d.test_y).tolist() == [1000] * 10
    assert d.classes == list(CIFAR10_CLASSES)
