import os

import pytest
import torch

from bench.data.sources import load_dataset

# Each test worker (pytest-xdist) and every process a test starts gets its share of the cores:
# two workers each spinning two OpenMP threads on two cores would mostly wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    SHARE = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ.setdefault("OMP_NUM_THREADS", SHARE)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One cache for the real CIFAR-10 copy, so it is decoded once per test session."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 4-class synthetic dataset small enough to train a smoke model on in seconds."""
    return load_dataset("synthetic", None, tmp_path_factory.mktemp("cache"),
                        synthetic={"classes": 4, "size": 32, "train_per_class": 40, "test_per_class": 10, "seed": 0})


@pytest.fixture(scope="session")
def shared_start(tmp_path_factory):
    """Smoke runs that share the seed's MAE stage and mae_finetune's fine-tune, in one results
    directory (and the other order, Semi-ViT first, in a second): {"runs": {name: run dir}, ...}."""
    from helpers import SEMI_VIT_STAGE2_ARGS as SEMI_VIT, SHARED_START_ARGS, bench, run_dirs
    root = tmp_path_factory.mktemp("shared-start")
    cache = root / "cache"
    plan = [("a", "mae_finetune", []), ("a", "semi_vit", SEMI_VIT),
            ("a", "semi_vit_stage_ema", ["semi_vit", *SEMI_VIT, "--teacher-start", "stage_ema"]),
            ("a", "fixmatch_mae", ["fixmatch", "--start", "mae", "--tau", "0.3"]),
            ("a", "semi_mae_mae", ["semi_mae", "--start", "mae"]),
            ("a", "ssmae_mae", ["ssmae", "--start", "mae", "--gate-warmup-steps", "5"]),
            ("b", "semi_vit_first", ["semi_vit", *SEMI_VIT]), ("b", "mae_finetune_second", ["mae_finetune"])]
    runs = {}
    for where, name, args in plan:
        method, extra = (args[0], args[1:]) if args and not args[0].startswith("-") else (name, args)
        out = bench(["run", method, *SHARED_START_ARGS, *extra, "--results-dir", str(root / where)], cache)
        assert out.returncode == 0, (name, out.stderr[-3000:])
        runs[name] = run_dirs(root / where)[-1]
    return {"root": root, "cache": cache, "runs": runs}


# The longest files start first, so the two test workers (pytest-xdist, a file per worker) end
# together: a long file handed out last would run alone at the end.
LONGEST_FIRST = ("study/test_study.py", "distributed/test_distributed.py", "data/test_imagenet.py",
                 "study/test_study_workers.py", "distributed/test_slurm.py", "method/test_real_data.py",
                 "run/test_stages.py", "study/test_compare.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0].removeprefix("tests/"), len(rank)))
