"""ImageNet-scale data on a CPU, no network: a generated ILSVRC-layout tree (thousands of JPEGs of
varied sizes and aspect ratios, a PNG named .JPEG, CMYK and greyscale JPEGs), its on-disk cache,
the streamed store, standard label-subset files, and published weights."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data.sources import load_dataset
from bench.data.store import ResidentStore, StreamedStore
from bench.data.store.build import decode_resized
from builders import WNIDS, write_imagenet_tree
from helpers import REPO, bench, bench_env, load_json, run_dirs, wait_for

SIDE = 48
TINY = ["--preset", "smoke", "--no-progress", "--image-side", str(SIDE), "--img-size", "32", "--patch-size", "8",
        "--eval-every", "10", "--ckpt-every", "10", "--log-every", "5"]


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    written = write_imagenet_tree(root, train_per_class=400, val_per_class=30)
    return root, written


@pytest.fixture(scope="session")
def cache(tree, tmp_path_factory):
    """The tree's cache, built once (the runs below reuse it)."""
    cache = tmp_path_factory.mktemp("cache")
    load_dataset("imagenet", tree[0], cache, image_side=SIDE, progress=False)
    return cache


def dataset(tree, cache):
    return load_dataset("imagenet", tree[0], cache, image_side=SIDE, progress=False)


def test_the_cache_holds_every_image_as_rgb_at_a_fixed_side_in_imagefolder_order(tree, cache):
    root, written = tree
    d = dataset(tree, cache)
    assert isinstance(d.train_x, np.memmap) and d.train_x.shape == (6 * 400, SIDE, SIDE, 3)
    assert d.test_x.shape == (6 * 30, SIDE, SIDE, 3) and d.classes == sorted(WNIDS)
    # torchvision's ImageFolder order: classes sorted, then file names sorted within each
    assert d.train_files == sorted(d.train_files, key=lambda f: (f.split("/")[1], f.split("/")[2]))
    assert sorted(d.train_files) == sorted(k for k in written if k.startswith("train/"))   # each image once
    from PIL import Image
    wnid = WNIDS[0]
    quirks = {k: d.train_files.index(f"train/{wnid}/{wnid}_{k}.JPEG") for k in (0, 1, 2, 3)}
    assert Image.open(root / d.train_files[quirks[1]]).format == "PNG"   # the tree holds real ImageNet's quirks
    assert Image.open(root / d.train_files[quirks[2]]).mode == "CMYK"
    assert Image.open(root / d.train_files[quirks[3]]).mode == "L"
    for i in (*quirks.values(), 13, 401, 2399):   # plain, PNG named .JPEG, CMYK, greyscale, others: all RGB
        rel = d.train_files[i]
        assert np.array_equal(d.train_x[i], decode_resized(str(root / rel), SIDE)), rel
        assert d.train_y[i] == written[rel][0]


def test_streamed_batches_equal_resident_batches(tree, cache):
    d = dataset(tree, cache)
    resident, streamed = ResidentStore(d.train_x, torch.device("cpu")), StreamedStore(d.train_x, torch.device("cpu"))
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.choice(len(d.train_y), 64, replace=False)
        streamed.prefetch(idx)
        assert torch.equal(streamed.gather(idx), resident.gather(idx))
    idx = np.array([5, 6, 7, 7, 2399, 0])                           # runs, a repeat, both ends
    assert torch.equal(streamed.gather(idx), resident.gather(idx))


def test_a_run_on_the_streamed_store_equals_the_run_on_the_resident_store(tree, cache, tmp_path):
    finals = []
    for store in ("resident", "streamed"):
        out = bench(["run", "fixmatch", "--dataset", "imagenet", "--data", str(tree[0]), *TINY, "--steps", "20",
                     "--tau", "0.3", "--store", store, "--results-dir", str(tmp_path / store)], cache)
        assert out.returncode == 0, out.stderr[-2000:]
        (run,) = run_dirs(tmp_path / store)
        assert load_json(run / "info.json")["runtime"]["store_used"] == store   # a runtime fact, beside the config
        assert "store_used" not in load_json(run / "config.json")
        finals.append(torch.load(run / "checkpoint.pt", weights_only=False)["model"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_resume_after_a_kill_on_the_streamed_store_reaches_the_same_weights(tree, cache, tmp_path):
    args = ["run", "supervised", "--dataset", "imagenet", "--data", str(tree[0]), *TINY, "--steps", "120",
            "--store", "streamed"]
    whole = bench([*args, "--results-dir", str(tmp_path / "a")], cache)
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", *args, "--results-dir", str(tmp_path / "b")],
                            cwd=REPO, env=bench_env(cache), stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "b" / "runs" / "1" / "checkpoint.pt"
    wait_for(ckpt, proc, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = bench([*args, "--results-dir", str(tmp_path / "b"), "--resume", "1"], cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "a" / "runs" / "1" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(ckpt, weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# The run's peak anonymous memory (RssAnon, sampled every 10 ms): what the process itself holds.
# Pages of the memory-mapped cache it has read are the kernel's page cache (RssFile), reclaimable
# at any time, and counted by ru_maxrss, which would charge the streamed store for the images read.
MEASURE = """
import subprocess, sys, time
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
peak = 0
while proc.poll() is None:
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("RssAnon:")])
    except OSError:
        pass
    time.sleep(0.01)
assert proc.returncode == 0, proc.returncode
print(peak)
"""


def peak_rss_mb(args, cache):
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "bench.cli", *args], cwd=REPO,
                         env=bench_env(cache), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1]) / 1024


def test_peak_memory_on_the_streamed_store_does_not_grow_with_the_dataset(tmp_path_factory):
    """Bound: a streamed run's peak anonymous memory grows by less than half as much as its dataset when it
    grows by 3x (here from ~64 MB to ~190 MB of decoded images), where a resident run's grows by
    the dataset's size. The runs read every image (evaluation covers the test set, and the
    training stream covers the train set)."""
    side, peaks = 112, {}
    for per_class in (200, 600):
        root = tmp_path_factory.mktemp(f"big{per_class}")
        write_imagenet_tree(root, train_per_class=per_class, val_per_class=20, quirks=False)
        cache = tmp_path_factory.mktemp(f"bigcache{per_class}")
        load_dataset("imagenet", root, cache, image_side=side, progress=False)  # the build is not the run
        for store in ("streamed", "resident"):
            args = ["run", "supervised", "--dataset", "imagenet", "--data", str(root), "--preset", "smoke",
                    "--image-side", str(side), "--img-size", "32", "--patch-size", "8", "--steps", "40",
                    "--batch-size", "64", "--eval-every", "40", "--store", store, "--no-progress",
                    "--results-dir", str(tmp_path_factory.mktemp("r"))]
            peaks[(per_class, store)] = peak_rss_mb(args, cache)
    grown = {s: peaks[(600, s)] - peaks[(200, s)] for s in ("streamed", "resident")}
    data_mb = 6 * 400 * side * side * 3 / 2**20
    print(f"peak RSS MB: {peaks}")
    # half the data's growth: the peak's own noise (allocator arenas, threads) reaches ~40 MB here,
    # while a store that held the images would grow by all of it (the resident bound below)
    assert grown["streamed"] < 0.5 * data_mb, (grown, peaks)
    assert grown["resident"] > 0.8 * data_mb, (grown, peaks)  # the measure sees a dataset held in memory


BUILD = """
import sys
from bench.data.sources import load_dataset

load_dataset("imagenet", sys.argv[1], sys.argv[2], image_side=int(sys.argv[3]), progress=False)
"""


def test_a_cache_build_killed_midway_resumes_and_finishes_with_the_same_bytes(tree, tmp_path):
    root = tree[0]
    clean = tmp_path / "clean"
    load_dataset("imagenet", root, clean, image_side=40, progress=False)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(root), str(killed), "40"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while True:
        done = list(killed.glob("arrays/*.partial/done-train.npy"))
        if done and np.load(done[0], mmap_mode="r").sum() >= 256:
            break
        assert time.time() < deadline and proc.poll() is None, "the build ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = next(killed.glob("arrays/*.partial"))
    assert 0 < np.load(partial / "done-train.npy").sum() < 6 * 400  # killed midway
    load_dataset("imagenet", root, killed, image_side=40, progress=False)       # continues
    (a,), (b,) = list(clean.glob("arrays/*-s40")), list(killed.glob("arrays/*-s40"))
    assert not list(killed.glob("arrays/*.partial"))
    for name in ("train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy", "files.json", "classes.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# -- bad input ---------------------------------------------------------------------------------
def rejected(out, words, results):
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("cache ")]
    assert out.returncode == 2 and len(lines) == 1 and words in lines[0], out.stderr[-2000:]
    assert not results.exists() or not any(results.rglob("*"))


def split_file_cases(tree, tmp_path):
    root = tree[0]
    files = sorted(p.name for p in (root / "train").glob("*/*.JPEG"))
    cases = {"missing image": ("n01440764_99999.JPEG\n", "is not among the training images"),
             "duplicate": (f"{files[0]}\n{files[5]}\n{files[0]}\n", "is listed 2 times"),
             "unknown class": ("n09999999_1.JPEG\n", "of class n09999999, which this dataset does not have"),
             "empty": ("\n\n", "the file is empty"),
             "wrong format": ("Index\n12\nnot-a-number\n", "has no integer Index"),
             "index out of range": ("Index\n0\n999999\n", "index 999999 is outside the"),
             "csv without an index column": ("Name,Label\nx,1\n", "is not a file name"),
             # a 1-image-a-class file under an explicit 10 %: the row would be mislabelled
             "budget disagrees": ("".join(f"{f}\n" for f in files[::400]), "but --label-fraction is 0.1")}
    for name, (text, words) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.txt"
        path.write_text(text)
        yield name, path, words, ["--label-fraction", "0.1"] if name == "budget disagrees" else []


def test_bad_split_files_are_one_line_exit_2_and_nothing_written(tree, cache, tmp_path):
    for name, path, words, extra in split_file_cases(tree, tmp_path):
        results = tmp_path / "r"
        out = bench(["run", "fixmatch", "--dataset", "imagenet", "--data", str(tree[0]), *TINY, "--split-file",
                     str(path), *extra, "--results-dir", str(results)], cache)
        rejected(out, words, results)


def test_split_files_in_both_formats_give_one_split_with_its_counts_shown(tree, cache, tmp_path):
    d = dataset(tree, cache)
    chosen = [i for i, f in enumerate(d.train_files) if int(Path(f).stem.split("_")[1]) % 20 == 0]
    simclr = tmp_path / "5percent.txt"
    simclr.write_text("\n".join(Path(d.train_files[i]).name for i in chosen) + "\n")
    semivit = tmp_path / "train_5p_index.csv"
    semivit.write_text("Index\n" + "\n".join(map(str, reversed(chosen))) + "\n")
    hashes = []
    # the file sets the budget; an explicit fraction that agrees with it is accepted too
    for path, budget in ((simclr, []), (semivit, ["--label-fraction", "0.05"])):
        out = bench(["run", "fixmatch", "--dataset", "imagenet", "--data", str(tree[0]), *TINY, "--steps", "5",
                     "--split-file", str(path), *budget, "--results-dir", str(tmp_path / path.stem)], cache)
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"{len(chosen)} labeled images, 20-20 per class in 6 classes" in out.stdout
        (run,) = run_dirs(tmp_path / path.stem)
        split = load_json(run / "split.json")
        assert sorted(split["labeled"] + split["val"]) == chosen        # the file's images, validation carved
        assert split["key"]["split_file"]["sha256"] and split["key"]["split_file"]["format"] in ("simclr", "semivit")
        assert load_json(run / "config.json")["label_fraction"] == len(chosen) / len(d.train_files) == 0.05
        hashes.append(split["hash"])
    assert hashes[0] == hashes[1]


def test_imagenet_layout_errors_are_one_line(tmp_path):
    cases = []
    flat = tmp_path / "flat"
    write_imagenet_tree(flat, wnids=WNIDS[:2], train_per_class=3, val_per_class=2, quirks=False)
    for f in list((flat / "val").glob("*/*.JPEG")):
        f.rename(flat / "val" / f.name)
    cases.append((flat, "is the flat validation set of the ILSVRC tarball"))
    odd = tmp_path / "odd"
    write_imagenet_tree(odd, wnids=WNIDS[:2], train_per_class=3, val_per_class=2, quirks=False)
    (odd / "train" / "cats").mkdir()
    cases.append((odd, "train/cats is not an ImageNet class folder"))
    corrupt = tmp_path / "corrupt"
    write_imagenet_tree(corrupt, wnids=WNIDS[:2], train_per_class=3, val_per_class=2, quirks=False)
    bad = corrupt / "train" / WNIDS[1] / f"{WNIDS[1]}_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:40])
    cases.append((corrupt, f"{bad}: cannot decode the image"))
    for root, words in cases:
        results = tmp_path / "r"
        out = bench(["run", "supervised", "--dataset", "imagenet", "--data", str(root), *TINY,
                     "--results-dir", str(results)], tmp_path / "cache")
        rejected(out, words, results)
    (partial,) = list((tmp_path / "cache").glob("arrays/*.partial"))  # the corrupt tree's partial cache is kept
    # replaced by a readable copy (another size): the same partial build continues and completes
    from PIL import Image
    Image.new("RGB", (50, 30), (200, 10, 10)).save(bad, format="JPEG")
    d = load_dataset("imagenet", corrupt, tmp_path / "cache", image_side=SIDE, progress=False)
    assert not partial.exists() and not list((tmp_path / "cache").glob("arrays/*.partial"))
    row = d.train_files.index(f"train/{WNIDS[1]}/{bad.name}")
    assert abs(d.train_x[row].astype(int) - [200, 10, 10]).max() < 12


# -- published weights ---------------------------------------------------------------------------
def vit(**kw):
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8,
                             embed_dim=64, depth=2, num_heads=2, **kw)


def test_init_from_loads_mae_and_timm_checkpoints_strictly(tmp_path):
    import argparse
    from safetensors.torch import save_file
    source = vit()
    encoder = source.state_dict()
    mae = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {**encoder, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64)},
                "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny")}, mae)
    timm_file = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.items()}, str(timm_file))
    for path in (mae, timm_file):
        results = tmp_path / path.stem
        out = bench(["run", "mae_finetune", "--preset", "smoke", "--img-size", "64", "--patch-size", "8",
                     "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--global-pool", "token",
                     "--init-from", str(path), "--steps", "1", "--lr", "1e-12", "--warmup-steps", "0",
                     "--no-progress", "--results-dir", str(results)], tmp_path / "cache")
        assert out.returncode == 0, out.stderr[-2000:]
        (run,) = run_dirs(results)
        info = load_json(run / "info.json")
        assert "pretrain" not in (info.get("stages") or {})                     # no MAE pretraining
        assert info["start"].startswith(f"file {path.name}")
        assert info["init_from"]["sha256"] and info["init_from"]["tensors"] == len(encoder)
        stage = results / "stages" / load_json(run / "run.json")["result"]["stage_key"]  # the fine-tune is a stage
        loaded = torch.load(stage / "final.pt", weights_only=False)["model"]
        for k, v in encoder.items():       # one step at lr 1e-12 moves nothing measurable
            torch.testing.assert_close(loaded[f"vit.{k}"], v, atol=1e-6, rtol=0, msg=k)
    # another grid: the position table is resampled, everything else loads as it is
    results = tmp_path / "grid"
    out = bench(["run", "mae_finetune", "--preset", "smoke", "--img-size", "32", "--patch-size", "8",
                 "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--init-from", str(mae), "--steps", "1",
                 "--no-progress", "--results-dir", str(results)], tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pos_embed resampled to a 4x4 grid" in load_json(run_dirs(results)[0] / "info.json")["init_from"]["notes"]
    # a file that lacks encoder tensors stops the run before anything is written
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in encoder.items() if not k.startswith("blocks.1.")}, partial)
    results = tmp_path / "bad"
    out = bench(["run", "mae_finetune", "--preset", "smoke", "--img-size", "64", "--patch-size", "8",
                 "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--init-from", str(partial),
                 "--no-progress", "--results-dir", str(results)], tmp_path / "cache")
    rejected(out, "the file lacks encoder tensors blocks.1.", results)
    # a position table without the class token's row, on another grid: refused, not read at an offset
    tokenless = tmp_path / "tokenless.pth"
    torch.save({**encoder, "pos_embed": encoder["pos_embed"][:, 1:]}, tokenless)
    out = bench(["run", "mae_finetune", "--preset", "smoke", "--img-size", "32", "--patch-size", "8",
                 "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--init-from", str(tokenless),
                 "--no-progress", "--results-dir", str(results)], tmp_path / "cache")
    rejected(out, "its position table has 0 leading token row(s) before a 8x8 grid, the model's 1", results)


def test_the_papers_studies_run_smoke_sized_on_an_imagenet_tree(tree, cache, tmp_path):
    """paper_semi_vit and paper_semi_mae as shipped (preset imagenet_semivit: rrc views, jitter,
    erasing, stage-2 recipe), shrunk to a tiny ViT and a few steps."""
    shrink = ["--set", "encoder=vit_tiny_patch16_224", "--set", "embed_dim=64", "--set", "depth=2", "--set",
              "num_heads=2", "--set", "img_size=32", "--set", "patch_size=8", "--set", f"image_side={SIDE}",
              "--set", "steps=8", "--set", "batch_size=8", "--set", "warmup_steps=2", "--set", "eval_every=4",
              "--set", "ckpt_every=4", "--set", "log_every=2", "--set", "eval_batch_size=128", "--set", "amp=fp32",
              *[f"--set={m}.{k}" for m in ("mae_finetune", "semi_vit")
                for k in ("pretrain_steps=4", "pretrain_batch_size=16", "pretrain_warmup_steps=1")],
              "--set", "decoder_dim=32", "--set", "decoder_depth=1", "--set", "decoder_heads=2",
              "--set", "semi_vit.finetune_steps=4", "--set", "semi_vit.finetune_batch_size=8",
              "--set", "semi_vit.finetune_warmup_steps=1", "--set", "val_from=unlabeled"]
    for study, extra in (("paper_semi_vit", ["--variants", "vit_b_1p", "vit_b_10p"]), ("paper_semi_mae", [])):
        results = tmp_path / study
        out = bench(["study", study, "--dataset", "imagenet", "--data", str(tree[0]), "--no-progress", *extra,
                     *shrink, "--results-dir", str(results)], cache, timeout=1200)
        assert out.returncode == 0, out.stderr[-3000:]
        table = (results / "reports" / study / "imagenet-imagenet_semivit" / "table.md").read_text()
        assert "(paper)" in table and "—" in table
        for run in run_dirs(results):
            cfg = load_json(run / "config.json")
            assert load_json(run / "run.json")["status"] == "COMPLETED"
            assert (cfg["crop"], cfg["eval_crop"], cfg["dataset"]) == ("rrc", 0.875, "imagenet")


def test_auto_keeps_decoded_data_resident_and_streams_a_cache_too_big_for_memory(tmp_path):
    from bench.config import resolve
    from bench.method.base import get_method
    from bench.data.store import choose
    cpu = torch.device("cpu")
    assert choose("auto", 1 << 60, cpu, on_disk=False) == "resident"   # CIFAR is in memory already
    assert choose("auto", 1 << 60, cpu, on_disk=True) == "streamed"
    assert choose("auto", 1 << 20, cpu, on_disk=True) == "resident"
    # the run decides once; its stages' trainers open the same store
    from bench.data.sources import make_synthetic
    from bench.data.splits import make_split
    from bench.train.trainer import Trainer
    data = make_synthetic(classes=2, size=32, train_per_class=4, test_per_class=2)
    cfg = resolve(get_method("supervised"), preset="smoke", cli={"store": "auto"})
    t = Trainer(cfg, get_method("supervised"), data, make_split(data.train_y, 2, label_fraction=0.5), tmp_path,
                store="resident")
    assert t.train_store.kind == "resident" and t.test_store.kind == "resident"


def test_a_split_file_counts_by_its_content_not_its_path(tree, cache, tmp_path):
    from bench.data.split_files import read_split_file
    from bench.data.splits import make_split
    d = dataset(tree, cache)
    text = "".join(f"{Path(f).name}\n" for f in d.train_files[::10])
    keys = []
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "10percent.txt").write_text(text)
        labeled, info = read_split_file(tmp_path / where / "10percent.txt", d.train_files, d.train_y, d.classes)
        keys.append(make_split(d.train_y, 6, labeled_from=labeled, split_file=info).key)
    assert keys[0] == keys[1] and keys[0]["split_file"]["sha256"]


def test_split_file_names_that_repeat_across_classes_and_doubled_index_columns_are_told_apart(tmp_path):
    from bench.errors import UsageError
    from bench.data.split_files import read_split_file
    files = ["train/cat/001.jpg", "train/cat/002.jpg", "train/dog/001.jpg", "train/dog/003.jpg"]
    y, classes = np.array([0, 0, 1, 1]), ["cat", "dog"]
    listed = tmp_path / "names.txt"
    listed.write_text("001.jpg\n")
    with pytest.raises(UsageError, match="001.jpg is the name of images in classes cat, dog; write it as"):
        read_split_file(listed, files, y, classes)
    listed.write_text("dog/001.jpg\n002.jpg\n")                       # class/name, and a unique bare name
    assert list(read_split_file(listed, files, y, classes)[0]) == [1, 2]
    csv_file = tmp_path / "index.csv"
    csv_file.write_text("index,Index\n0,3\n1,2\n")                    # pandas' row number beside Semi-ViT's column
    assert list(read_split_file(csv_file, files, y, classes)[0]) == [2, 3]
    csv_file.write_text("index,INDEX\n0,3\n")
    with pytest.raises(UsageError, match="has 2 index columns"):
        read_split_file(csv_file, files, y, classes)
