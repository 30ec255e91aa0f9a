"""One run on two ranks (Gloo on CPU) is the run on one rank: the same pixels, losses and weights
up to the order of float reductions; only rank 0 writes; a killed rank fails the run in bounded
time and `--resume` finishes it; a batch that does not split, missing or unreachable
rendezvous and more GPU ranks than GPUs are bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench.distributed.world import check_devices, expand_hostlist, first_host, from_env
from bench.errors import UsageError
from helpers import REPO, bench_env, load_json, run_dirs, wait_for


SMOKE = ["--preset", "smoke", "--no-progress", "--device", "cpu", "--dist-timeout", "30", "--steps", "40",
         "--eval-every", "20", "--ckpt-every", "20", "--log-every", "5"]
# per method: options that make its distributed pieces act (admission, gate and memory, mixing)
ACTIVE = {"supervised": ["--mixup-alpha", "0.8", "--cutmix-alpha", "1.0", "--labeled-view", "strong"],
          "fixmatch": ["--tau", "0.3"],
          "flexmatch": ["--tau", "0.3"],
          "freematch": [],
          "ssmae": ["--confidence", "0.3", "--gate-threshold", "0", "--gate-warmup-steps", "5", "--gate-every", "5"],
          "semi_vit": ["--tau", "0.3"]}
# float sums in another order: per-step losses agree to ~1e-6 relative, weights after 40 AdamW
# steps to ~1e-4 (measured: <= 1e-4); a different image, mask or partner would move them by > 1e-2
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 2e-3


def run(args, cache, nproc=1, timeout=900, env=None):
    full = [sys.executable, "-m", "bench.cli", "run", *args] + (["--nproc", str(nproc)] if nproc > 1 else [])
    return subprocess.run(full, cwd=REPO, env={**bench_env(cache), "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Each method once on one rank and once on two, each in its own results directory."""
    root = tmp_path_factory.mktemp("worlds")
    out = {}
    for method, extra in ACTIVE.items():
        dirs = {}
        for n in (1, 2):
            results = root / method / f"ws{n}"
            done = run([method, *SMOKE, *extra, "--results-dir", str(results)], root / "cache", nproc=n)
            assert done.returncode == 0, (method, n, done.stderr[-3000:])
            dirs[n] = results
        out[method] = dirs
    return out


def final(results):
    (run_dir,) = run_dirs(results)
    return run_dir, torch.load(run_dir / "checkpoint.pt", weights_only=False)


@pytest.mark.parametrize("method", list(ACTIVE))
def test_two_ranks_train_the_run_one_rank_trains(pairs, method):
    (dir1, one), (dir2, two) = final(pairs[method][1]), final(pairs[method][2])
    assert one["step"] == two["step"] == 40
    worst = max((one["model"][k].float() - two["model"][k].float()).abs().max().item() for k in one["model"])
    assert worst < WEIGHT_ATOL, f"{method}: weights differ by {worst}"
    m1, m2 = load_json(dir1 / "metrics.json"), load_json(dir2 / "metrics.json")
    expected = ["train.loss"] + (["train.pl_rate", "train.pl_precision"] if method != "supervised" else []) + (
        ["gate.hc_acc", "memory.size"] if method == "ssmae" else [])
    for name in expected:
        assert name in m1 and name in m2, (method, name)
        assert m1[name]["steps"] == m2[name]["steps"], name
        assert m2[name]["values"] == pytest.approx(m1[name]["values"], rel=LOSS_RTOL, abs=1e-6), (method, name)
    if method in ("fixmatch", "flexmatch", "freematch", "ssmae", "semi_vit"):
        assert max(m1["train.pl_rate"]["values"]) > 0, "pseudo-labels must be admitted for the check to mean much"
    if method in ("flexmatch", "freematch"):  # one policy state, reduced over the global batch
        p1, p2 = one["method"]["threshold_policy"], two["method"]["threshold_policy"]
        for k in p1:
            if p1[k].is_floating_point():
                torch.testing.assert_close(p2[k], p1[k], rtol=LOSS_RTOL, atol=1e-6, msg=k)
            else:
                assert torch.equal(p1[k], p2[k]), k
    if method == "ssmae":  # one memory and one gate, the same on every rank and as on one rank
        assert torch.equal(one["method"]["memory"]["labels"], two["method"]["memory"]["labels"])
        assert one["method"]["gate"]["is_open"] and one["method"]["gate"] == two["method"]["gate"]
    r1, r2 = load_json(dir1 / "run.json")["result"], load_json(dir2 / "run.json")["result"]
    assert r1["budget"] == r2["budget"]                          # counted over every rank
    cfg, runtime = load_json(dir2 / "config.json"), load_json(dir2 / "info.json")["runtime"]
    assert runtime["world_size"] == 2 and runtime["rank_batch"]["labeled"] == cfg["batch_size"] // 2
    assert "world_size" not in cfg   # runtime facts sit beside the config, not in it


def files(results):
    names = set()
    for p in results.rglob("*"):
        if p.is_file():
            rel = p.relative_to(results).as_posix()
            names.add(rel.split("events.out.tfevents")[0] + "events" if "events.out.tfevents" in rel else rel)
    return names


@pytest.mark.parametrize("method", ["supervised", "semi_vit"])
def test_only_rank_zero_writes(pairs, method):
    """The results of a two-rank run hold exactly the files of a one-rank run: one run record,
    one set of checkpoints, one stage cache (Semi-ViT trains two stages on both ranks)."""
    assert files(pairs[method][2]) == files(pairs[method][1])


def two_ranks_until_checkpoint(args, results, cache):
    """A two-rank `bench run` started in the background, returned once its first checkpoint exists."""
    launcher = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", *args, "--results-dir", str(results),
                                 "--nproc", "2"], cwd=REPO, env={**bench_env(cache), "OMP_NUM_THREADS": "1"},
                                stderr=subprocess.PIPE, text=True)
    ckpt = results / "runs" / "1" / "checkpoint.pt"
    wait_for(ckpt, launcher, timeout=300)
    return launcher, ckpt


def test_a_killed_rank_fails_the_run_in_bounded_time_and_resume_finishes_it(tmp_path):
    args = ["supervised", "--preset", "smoke", "--no-progress", "--device", "cpu", "--dist-timeout", "20",
            "--steps", "400", "--ckpt-every", "20", "--eval-every", "100", "--log-every", "10"]
    cache = tmp_path / "cache"
    reference = run([*args, "--results-dir", str(tmp_path / "a")], cache, nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    launcher, ckpt = two_ranks_until_checkpoint(args, tmp_path / "b", cache)
    rank1 = next(pid for pid in child_pids(launcher.pid) if "RANK=1" in environ(pid))
    os.kill(rank1, signal.SIGKILL)
    killed = time.time()
    launcher.wait(timeout=120)
    took = time.time() - killed
    err = launcher.stderr.read()
    assert launcher.returncode == 1 and took < 60, (took, err[-2000:])
    (run_dir,) = run_dirs(tmp_path / "b")
    assert load_json(run_dir / "run.json")["status"] == "FAILED"
    assert load_json(run_dir / "info.json")["failure"].startswith("PeerLost: ")
    assert "rank 1 of 2 was killed by signal 9" in err and "--resume 1" in err, err[-2000:]
    step = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step < 400
    resumed = run([*args, "--results-dir", str(tmp_path / "b"), "--resume", "1"], cache, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = final(tmp_path / "a")[1], final(tmp_path / "b")[1]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k        # the same ranks, the same sums: bitwise


def test_a_two_rank_run_stopped_by_ctrl_c_resumes_on_one_rank(tmp_path):
    """Ctrl-C reaches both ranks, which checkpoint at the same step; the checkpoint holds nothing
    of the world size, so one rank continues it to the two-rank run's weights (up to float sums)."""
    args = ["fixmatch", "--preset", "smoke", "--no-progress", "--device", "cpu", "--tau", "0.3", "--steps", "300",
            "--ckpt-every", "20", "--eval-every", "100", "--log-every", "10", "--dist-timeout", "30"]
    cache = tmp_path / "cache"
    whole = run([*args, "--results-dir", str(tmp_path / "a")], cache, nproc=2)
    assert whole.returncode == 0, whole.stderr[-2000:]
    launcher, ckpt = two_ranks_until_checkpoint(args, tmp_path / "b", cache)
    launcher.send_signal(signal.SIGINT)
    launcher.wait(timeout=120)
    assert launcher.returncode == 130, launcher.stderr.read()[-2000:]
    (run_dir,) = run_dirs(tmp_path / "b")
    assert load_json(run_dir / "run.json")["status"] == "INTERRUPTED"
    assert torch.load(ckpt, weights_only=False)["step"] < 300
    resumed = run([*args, "--results-dir", str(tmp_path / "b"), "--resume", "1"], cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Over 300 steps float sums in another order grow (pseudo-labels near tau flip): the yardstick
    # is how far one rank's whole run ends from two ranks', measured here; a resume that lost its
    # state or its streams ends farther still.
    single = run([*args, "--results-dir", str(tmp_path / "c")], cache)
    assert single.returncode == 0, single.stderr[-2000:]
    (_, a), (_, b), (_, c) = final(tmp_path / "a"), final(tmp_path / "b"), final(tmp_path / "c")
    def distance(x, y):
        return max((x["model"][k].float() - y["model"][k].float()).abs().max().item() for k in x["model"])
    assert distance(a, b) < max(WEIGHT_ATOL, 2 * distance(a, c)), (distance(a, b), distance(a, c))


def child_pids(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def environ(pid):
    try:
        return open(f"/proc/{pid}/environ", "rb").read().replace(b"\0", b"\n").decode(errors="replace")
    except OSError:
        return ""


# -- bad input -----------------------------------------------------------------------------------
def assert_bad_input(done, words, results):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and words in lines[0], done.stderr[-2000:]
    assert not results.exists() or not any(results.rglob("*"))


def test_a_batch_that_does_not_split_over_the_ranks_is_bad_input(tmp_path):
    results = tmp_path / "r"
    done = run(["fixmatch", *SMOKE, "--batch-size", "33", "--results-dir", str(results)], tmp_path / "c", nproc=2)
    assert_bad_input(done, "--batch-size gives 33 images per step, which 2 ranks cannot share", results)
    done = run(["semi_vit", *SMOKE, "--pretrain-batch-size", "31", "--results-dir", str(results)], tmp_path / "c",
               nproc=2)
    assert_bad_input(done, "--pretrain-batch-size gives 31 images", results)


def test_missing_or_unreachable_rendezvous_is_bad_input(tmp_path):
    results = tmp_path / "r"
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    done = run(["supervised", *SMOKE, "--results-dir", str(results)], tmp_path / "c", env=env)
    assert_bad_input(done, "MASTER_ADDR and MASTER_PORT is not set", results)
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
    done = run(["supervised", *SMOKE, "--dist-timeout", "3", "--results-dir", str(results)], tmp_path / "c", env=env)
    assert done.returncode == 2 and "cannot join the process group at 127.0.0.1:9" in done.stderr, done.stderr[-2000:]
    assert not results.exists()


def test_more_gpu_ranks_than_gpus_is_bad_input():
    check_devices(2, "cuda", 2)
    check_devices(4, "cpu", 0)  # CPU ranks need no GPU
    with pytest.raises(UsageError, match="4 ranks on this node need as many GPUs, but 2 are visible"):
        check_devices(4, "cuda", 2)


def test_rank_and_world_come_from_torchrun_or_slurm():
    assert from_env({}) is None and from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    w, addr = from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (w.rank, w.size, w.local_rank) == (3, 8, 1) and addr == {"MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    w, addr = from_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NODELIST": "gpu[03-05,07]", "SLURM_JOB_ID": "1234"})
    assert (w.rank, w.size, w.local_rank) == (5, 16, 1) and addr == {"MASTER_ADDR": "gpu03", "MASTER_PORT": "29734"}
    assert first_host("cpu1,cpu2") == "cpu1" and first_host("a-b[1-2]") == "a-b1"
    assert first_host("rack[1-2]-node[01-04]") == "rack1-node01"


def test_slurm_node_lists_expand_as_slurm_expands_them():
    assert expand_hostlist("rack[1-2]-node[01-02],cpu[7,9-10],login") == [
        "rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02", "cpu7", "cpu9", "cpu10", "login"]
    assert expand_hostlist("gpu[098-101]") == ["gpu098", "gpu099", "gpu100", "gpu101"]
    assert expand_hostlist("a-b[1-2]") == ["a-b1", "a-b2"] and expand_hostlist("") == []
    with pytest.raises(UsageError, match="outside a world of 2"):
        from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
