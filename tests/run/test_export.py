"""`bench export`: a run's classifier as a folder timm loads offline, whose logits are the run's
model's and whose own evaluation transform reproduces the run's test accuracy."""
import json

import pytest
import timm
import torch
from PIL import Image

from bench.data.sources import load_for
from bench.model.vit_mae import build_model
from helpers import bench, load_json, run_dirs



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = bench(["run", "supervised", "--preset", "smoke", "--no-progress", "--steps", "20", "--eval-every", "10",
                 "--results-dir", str(root / "results")], root / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run_dirs(root / "results")[0]


def test_timm_loads_the_export_and_its_logits_are_the_runs(trained):
    root, run = trained
    out = bench(["export", "1", "--results-dir", str(root / "results"), "--out", str(root / "exp")], root / "cache")
    assert out.returncode == 0, out.stderr
    model = timm.create_model(f"local-dir:{root / 'exp'}", pretrained=True).eval()
    cfg = load_json(run / "config.json")
    selected = torch.load(run / "selected.pt", weights_only=False)
    ours = build_model(cfg, selected["state_dict"]["vit.head.weight"].shape[0], with_decoder=False)
    ours.load_state_dict(selected["state_dict"])
    x = torch.randn(5, 3, cfg["img_size"], cfg["img_size"])
    with torch.no_grad():
        assert torch.equal(model(x), ours.eval()(x))
    beside = json.loads((root / "exp" / "ssvit_run.json").read_text())
    assert beside["config"] == cfg and beside["weights"].startswith(f"selected on validation at step {selected['step']}")

    # timm's own evaluation transform, from the export's config, on the run's test images
    data_cfg = timm.data.resolve_data_config(model=model)
    transform = timm.data.create_transform(**data_cfg)
    data = load_for(cfg, root / "cache", progress=False)
    batch = torch.stack([transform(Image.fromarray(img)) for img in data.test_x])
    with torch.no_grad():
        acc = 100.0 * (model(batch).argmax(1).numpy() == data.test_y).mean()
    assert acc == pytest.approx(load_json(run / "run.json")["result"]["test_acc_selected"], abs=1e-6)


def test_export_into_a_used_folder_is_refused_and_writes_nothing(trained):
    root, run = trained
    used = root / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep")
    out = bench(["export", str(run), "--out", str(used), "--final"], root / "cache")
    assert out.returncode == 2 and "not empty" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert [p.name for p in used.iterdir()] == ["mine.txt"]
    assert not [p for p in root.iterdir() if p.name.startswith(".used.")]
