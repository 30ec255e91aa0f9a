"""Pseudo-labelling on real photographs: FixMatch and SSMAE, with the `cpu` preset's recipe and
thresholds, admit pseudo-labels on real CIFAR-10 images and those labels are far more often right
than chance. A recipe or mechanics change that silences pseudo-labelling fails here."""
import pytest

from builders import real_cifar10_subset
from helpers import SHARED_CIFAR10, bench, load_json, run_dirs

pytestmark = [pytest.mark.skipif(not SHARED_CIFAR10.exists(), reason="real CIFAR-10 copy not present")]
CLASSES = ("automobile", "frog", "horse", "ship")
# A small, fast model and a short budget; every recipe value (smoothing, views, thresholds, gate)
# stays the cpu preset's.
BUDGET = ["--embed-dim", "64", "--depth", "3", "--num-heads", "2", "--decoder-dim", "64", "--decoder-depth", "1",
          "--decoder-heads", "2", "--steps", "300", "--log-every", "20", "--eval-every", "300",
          "--ckpt-every", "300", "--label-fraction", "0.2", "--no-progress"]


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    return real_cifar10_subset(SHARED_CIFAR10, tmp_path_factory.mktemp("data") / "cifar10-4.tar", CLASSES,
                               train_per_class=500, test_per_class=100)


def admitted(run_dir):
    """(admission rate over the run's last quarter, mean precision of what it admitted there)."""
    metrics = load_json(run_dir / "metrics.json")
    rate, prec = metrics["train.pl_rate"], metrics["train.pl_precision"]
    tail = 0.75 * max(rate["steps"])
    rates = [v for s, v in zip(rate["steps"], rate["values"]) if s > tail]
    precs = [v for s, v in zip(prec["steps"], prec["values"]) if s > tail]
    return sum(rates) / len(rates), (sum(precs) / len(precs) if precs else 0.0)


@pytest.mark.parametrize("method, extra", [("fixmatch", []), ("ssmae", ["--gate-warmup-steps", "50",
                                                                     "--gate-every", "20"])])
def test_pseudo_labels_are_admitted_and_mostly_right_on_real_images(tmp_path, subset, method, extra):
    results = tmp_path / "r"
    out = bench(["run", method, "--preset", "cpu", "--dataset", "imagefolder", "--data", str(subset), *BUDGET,
                 *extra, "--results-dir", str(results)], tmp_path / "cache", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(results)
    rate, precision = admitted(run)
    chance = 1 / len(CLASSES)
    assert rate > 0.02, f"{method} admitted {rate:.1%} of its unlabeled images"
    assert precision > 2 * chance, f"{method}'s pseudo-labels are right {precision:.0%} of the time"
