"""A run's classifier as a folder timm loads offline: `timm.create_model("local-dir:DIR",
pretrained=True)`. timm's own `save_for_hf` writes the layout (config.json with the architecture,
its arguments and the evaluation preprocessing; model.safetensors with timm's own keys), and the
run's config and record travel beside it (ssvit_run.json), so the export names what made it."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.errors import UsageError
from bench.method.views import IMAGENET_MEAN, IMAGENET_STD
from bench.model.vit_mae import build_model
from bench.train import checkpoint


def export_run(run_dir: Path, out: Path, final: bool = False) -> dict[str, Any]:
    """Write the run's selected classifier (or, `final`, its last model) to `out`; returns what
    was written. Nothing is left at `out` unless the whole export succeeded."""
    cfg = _read_json(run_dir / "config.json", run_dir)
    info = _read_json(run_dir / "info.json", run_dir) if (run_dir / "info.json").is_file() else {}
    state, which = _weights(run_dir, final)
    num_classes = state["vit.head.weight"].shape[0] if "vit.head.weight" in state else None
    if num_classes is None:
        raise UsageError(f"{run_dir}: its weights hold no classifier head ({cfg.get('method')} does not classify); "
                         f"export a run of a method that does")
    model = build_model(cfg, num_classes, with_decoder=False)
    vit_state = {k[len("vit."):]: v for k, v in state.items() if k.startswith("vit.")}
    model.vit.load_state_dict(vit_state)
    model.vit.eval()
    crop = float(cfg.get("eval_crop") or 1.0)
    size = int(cfg["img_size"])
    data_config = {"input_size": (3, size, size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                   "crop_pct": min(crop, 1.0), "crop_mode": "center", "interpolation": "bilinear"}
    model_args = {"img_size": size, "num_classes": num_classes,
                  **{k: cfg[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "global_pool")
                     if cfg.get(k) is not None}}
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: the folder is not empty; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    from timm.models import save_for_hf
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_for_hf(model.vit, str(tmp), model_args=model_args, safe_serialization=True, data_config=data_config)
        config = json.loads((tmp / "config.json").read_text())  # not the timm tag's weights nor their licence
        config["pretrained_cfg"].update(tag=f"ssvit-{cfg.get('method')}")
        config["pretrained_cfg"].pop("license", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        record = {"run": str(run_dir.resolve()), "weights": which, "method": cfg.get("method"),
                  "dataset": cfg.get("dataset"), "input_size": [3, size, size], "mean": list(IMAGENET_MEAN),
                  "std": list(IMAGENET_STD), "crop_pct": data_config["crop_pct"], "config": cfg, "info": info}
        (tmp / "ssvit_run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "weights": which, "architecture": cfg["encoder"], "num_classes": num_classes}


def _weights(run_dir: Path, final: bool) -> tuple[dict[str, torch.Tensor], str]:
    if final:
        path = run_dir / "checkpoint.pt"
        if not path.is_file():
            raise UsageError(f"{run_dir}: no checkpoint.pt to export the final model from; export the selected one")
        ckpt = checkpoint.load(path)
        return ckpt["model"], f"final model at step {ckpt['step']}"
    path = run_dir / "selected.pt"
    if not path.is_file():
        raise UsageError(f"{run_dir}: no selected.pt (the run selected no model yet); pass --final for its last model")
    sel = torch.load(path, map_location="cpu", weights_only=False)
    return sel["state_dict"], f"selected on validation at step {sel['step']} ({sel['model']} model)"


def _read_json(path: Path, run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(f"{run_dir}: not a run folder (no readable {path.name}); give a run id or its path") from None
