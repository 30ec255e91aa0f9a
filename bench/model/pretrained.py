"""Start from published weights (`--init-from FILE`): MAE's official checkpoints and timm's files.

Semi-ViT's table starts from MAE's ImageNet-pretrained encoders; pretraining a ViT-B with MAE on
ImageNet takes dozens of GPUs. Two layouts are read, as local files (nothing is downloaded):
- MAE's `.pth` (facebookresearch/mae): `{"model": {...}, ...}` with timm-style encoder keys
  (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, `norm.weight`, ...) beside its decoder
  (`decoder_*`, `mask_token`), which is not loaded;
- timm's own weight files (a state dict, `.pth` / `.bin` / `.safetensors`, e.g. its `.mae` and
  DINO tags), and checkpoints that wrap one (`state_dict`, a `module.` prefix).

- the suite's own: a cached stage (`<results>/stages/KEY`, its `final.pt`) or a run
  (`<results>/runs/ID`, its `checkpoint.pt`, or `selected.pt`), keys as the suite's model names
  them (`vit.`, `decoder.`, `mae_norm.`): the MAE decoder comes too where the run's model has
  one, and the classifier head where it has the same shape (the suite's own classifier).

The mapping is strict: every encoder tensor of the run's model (patch embedding, class and
register tokens, position embedding, blocks, final norm) must come from the file, or the run
stops in one line naming what is missing. A position table for another grid is resampled
(bicubic, prefix tokens kept). An MAE or timm file's head is never loaded (another label set)
and is re-drawn as MAE fine-tunes, and its decoder is not read; an average-pooling model's `fc_norm` is fresh too (MAE's recipe), and the file's
final `norm` then initialises the MAE branch's latent norm where the model has one.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from bench.errors import UsageError
from bench.io import file_digest

ENCODER_PREFIXES = ("patch_embed.", "cls_token", "reg_token", "dist_token", "pos_embed", "blocks.", "norm.",
                    "norm_pre.")


def suite_file(path: Path) -> Path:
    """The weight file of a suite folder: a stage's final.pt, a run's checkpoint.pt or selected.pt."""
    if not path.is_dir():
        return path
    for name in ("final.pt", "checkpoint.pt", "selected.pt"):
        if (path / name).is_file():
            return path / name
    raise UsageError(f"--init-from {path}: a folder without final.pt, checkpoint.pt or selected.pt; give a "
                     f"stage folder (<results>/stages/KEY), a run folder (<results>/runs/ID) or a weight file")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file in any of the layouts, keys as the file names them."""
    where = f"--init-from {path}"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):  # MAE's checkpoints hold their args
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file; give the path to an MAE .pth or a timm weight file") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise UsageError(f"{where}: not a weight file torch can read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]})") from None
    for key in ("model", "state_dict", "model_state"):  # MAE's, timm wrappers', the suite's (raw model)
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{where}: holds no state dict of tensors (looked at the top level, 'model' and "
                         f"'state_dict'); give an MAE checkpoint or a timm weight file")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_into(path: str | Path, model) -> dict[str, Any]:
    """Load the file's encoder into `model` (a ViTMAE), strictly; returns what was done."""
    path = suite_file(Path(path).expanduser())
    state = read_state(path)
    if any(k.startswith("vit.") for k in state):
        return _load_suite(path, state, model)
    return _load_timm(path, state, model)


def _load_suite(path: Path, state: dict[str, torch.Tensor], model) -> dict[str, Any]:
    """The suite's own stage or run weights: the encoder strictly, the decoder and latent norm
    where the model has them, the head where its shape matches."""
    own = model.state_dict()
    encoder = [k for k in own if k.startswith("vit.") and not k.startswith("vit.head")]
    bad = [k for k in encoder if k not in state or state[k].shape != own[k].shape]
    if bad:
        raise UsageError(f"--init-from {path}: its encoder does not fit the run's model ({bad[0]} "
                         f"{'is missing' if bad[0] not in state else tuple(state[bad[0]].shape)}); match --encoder, "
                         f"--embed-dim, --depth, --patch-size and --img-size to the run that made it")
    take = {k: state[k] for k in encoder}
    parts = ["encoder"]
    for part in ("decoder.", "mae_norm.", "vit.head."):
        mine = [k for k in own if k.startswith(part)]
        if mine and all(k in state and state[k].shape == own[k].shape for k in mine):
            take.update({k: state[k] for k in mine})
            parts.append(part.rstrip(".").replace("vit.", ""))
    with torch.no_grad():
        model.load_state_dict(take, strict=False)
    return {"file": str(path), "sha256": file_digest(path), "tensors": len(take), "layout": "ssvit-bench",
            "loaded": parts, "head_loaded": "head" in parts, "notes": [], "not_loaded": []}


def _load_timm(path: Path, state: dict[str, torch.Tensor], model) -> dict[str, Any]:
    """MAE's or timm's encoder, strictly, resampling the position table to the model's grid."""
    from timm.layers import resample_abs_pos_embed
    where = f"--init-from {path}"
    vit = model.vit
    own = vit.state_dict()
    wanted = [k for k in own if k.startswith(ENCODER_PREFIXES)]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise UsageError(f"{where}: the file lacks encoder tensors {', '.join(missing[:4])}"
                         f"{f' (+{len(missing) - 4} more)' if len(missing) > 4 else ''}; is it a ViT of this "
                         f"--encoder / --embed-dim / --depth?")
    take, notes = {}, []
    for k in wanted:
        v = state[k]
        if k == "pos_embed" and v.shape != own[k].shape:
            if v.shape[-1] != own[k].shape[-1]:
                raise UsageError(f"{where}: its position embedding is {v.shape[-1]} wide, the model's "
                                 f"{own[k].shape[-1]}; the file is another ViT size")
            # leading rows that are not grid positions (a class token's): the file's, read from its
            # square grid, must be the model's, or the grid would be read at the wrong offset
            rows, grid = v.shape[1], model.grid[0] * model.grid[1]
            prefix, mine = rows - math.isqrt(rows) ** 2, own[k].shape[1] - grid
            if prefix != mine:
                raise UsageError(f"{where}: its position table has {prefix} leading token row(s) before a "
                                 f"{math.isqrt(rows)}x{math.isqrt(rows)} grid, the model's {mine} (its class "
                                 f"token); give a ViT file with a class token row, as MAE's and timm's have")
            v = resample_abs_pos_embed(v, new_size=list(model.grid), num_prefix_tokens=prefix)
            notes.append(f"pos_embed resampled to a {model.grid[0]}x{model.grid[1]} grid")
        if v.shape != own[k].shape:
            raise UsageError(f"{where}: {k} is {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the "
                             f"model; match --patch-size / --embed-dim / --depth to the file's ViT")
        take[k] = v.to(own[k].dtype)
    with torch.no_grad():
        vit.load_state_dict(take, strict=False)
        if model.mae_norm is not None and "norm.weight" in state and "norm.weight" not in own:
            model.mae_norm.weight.copy_(state["norm.weight"])
            model.mae_norm.bias.copy_(state["norm.bias"])
            notes.append("the file's final norm initialises the MAE branch's latent norm")
    unused = sorted({k.split(".")[0] for k in state if k not in take} - {"head"})
    return {"file": str(path), "sha256": file_digest(path), "tensors": len(take), "notes": notes,
            "not_loaded": unused}
