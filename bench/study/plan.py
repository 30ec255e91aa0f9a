"""A study's plan before it runs: its cells by method and axis value, the stages they share from
the cache, what is already recorded, and an estimate of its time on this device.

The estimate counts the FLOPs of each cell's budget from its models' shapes (every stage and the
run's own training: steps x the step's passes, `Method.step_passes`, plus its evaluations) and
divides by a rate measured once per device on a small ViT's training step (cached in
`~/.cache/ssvit-bench/throughput.json`): nothing large is timed, and no data is needed.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from bench.data.dataset import OFFICIAL_SIZES
from bench.errors import UsageError
from bench.io import atomic_write_text
from bench.method.base import get_method
from bench.model.vit_mae import build_model
from bench.run.stages import built_stage_configs, plan as stage_plan, stage_identity, stage_key

RATE_FORMAT = 2  # bump when the rate's workload changes
# What a run does beside its FLOPs (views, the store's gathers, evaluation bookkeeping, logging,
# checkpoints): recorded minutes of `cpu` runs over their FLOP estimate at the measured rate
# were 1.5-1.8 (bench run supervised --preset cpu --steps 400 --eval-every 200 on real CIFAR-10).
OVERHEAD = 1.5
CELL_START_S = 5.0  # a study cell's own process: Python, torch, the method registry and the cached arrays


# -- FLOPs -------------------------------------------------------------------------------------
MODEL_KEYS = ("encoder", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "global_pool",
              "pos_embed", "decoder_dim", "decoder_depth", "decoder_heads", "decoder_mlp_ratio")


def forward_flops(cfg: dict[str, Any], num_classes: int, mask_ratio: float | None = None,
                  attention: bool = True) -> float:
    """Multiply-adds x 2 of one image's forward pass through the config's ViT (an MAE pass: the
    encoder on the visible patches, the decoder on all), from the model's own shapes; without
    `attention`, the token x token products left out (as torch's FLOP counter leaves out fused
    attention)."""
    return sum(_forward_parts(cfg, num_classes, mask_ratio, attention))


def _forward_parts(cfg: dict[str, Any], num_classes: int, mask_ratio: float | None,
                   attention: bool) -> tuple[float, float]:
    """(the patch embedding's FLOPs, the rest's): the embedding's backward computes no input
    gradient, so it trains at twice its forward where the rest trains at three times."""
    shape = tuple((k, cfg.get(k)) for k in MODEL_KEYS)
    return _forward_flops(shape, num_classes, mask_ratio, attention)


@functools.lru_cache(maxsize=None)
def _forward_flops(shape: tuple, num_classes: int, mask_ratio: float | None, attention: bool) -> tuple[float, float]:
    cfg = {k: v for k, v in shape if v is not None}
    with torch.device("meta"):
        model = build_model(cfg, num_classes, with_decoder=mask_ratio is not None)
    vit = model.vit
    patches = vit.patch_embed.num_patches
    prefix = model.num_prefix_tokens
    seen = patches if mask_ratio is None else int(patches * (1 - mask_ratio))
    embed = 2 * patches * vit.patch_embed.proj.weight.numel()  # every patch is embedded, then masked
    flops = sum(_block_flops(block, seen + prefix, attention) for block in vit.blocks)
    if mask_ratio is None:
        flops += 2 * vit.head.weight.numel() if hasattr(vit.head, "weight") else 0
    else:
        dec = model.decoder
        flops += 2 * (seen + prefix) * dec.embed.weight.numel()
        flops += sum(_block_flops(block, patches + prefix, attention) for block in dec.blocks)
        flops += 2 * (patches + prefix) * dec.pred.weight.numel()
    return float(embed), float(flops)


def _block_flops(block, tokens: int, attention: bool = True) -> float:
    """A transformer block: its linear layers on every token, and attention's two token x token products."""
    linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    width = block.attn.qkv.weight.shape[1]
    return 2 * tokens * linear + (4 * tokens * tokens * width if attention else 0)


def step_flops(cfg: dict[str, Any], method_cls, num_classes: int, attention: bool = True) -> float:
    """One training step: each pass's images x its forward FLOPs (x3 when trained: forward and
    backward, whose input and weight gradients cost a forward each)."""
    total = 0.0
    for p in method_cls.step_passes(cfg):
        embed, rest = _forward_parts(cfg, num_classes, p.mask_ratio, attention)
        total += p.images * ((2 * embed + 3 * rest) if p.trained else (embed + rest))
    return total


def eval_flops(cfg: dict[str, Any], num_classes: int, test_images: int | None) -> float:
    """The run's evaluations: the raw and EMA models on the test images, every eval_every steps."""
    if not test_images or cfg.get("eval_every", 0) <= 0:
        return 0.0
    return (cfg["steps"] // cfg["eval_every"] + 1) * 2 * test_images * forward_flops(cfg, num_classes)


def test_images_of(cfg: dict[str, Any]) -> int | None:
    """The test images each evaluation reads, where the dataset's size is known without reading it."""
    if cfg["dataset"] == "synthetic":
        return cfg["synthetic_classes"] * cfg["synthetic_test_per_class"]
    return OFFICIAL_SIZES.get(cfg["dataset"], (None, None))[1]


def num_classes_of(cfg: dict[str, Any]) -> int:
    if cfg["dataset"] == "synthetic":
        return cfg["synthetic_classes"]
    return OFFICIAL_SIZES.get(cfg["dataset"], (10, None))[0]  # an image folder's count is unknown until read


def cell_parts(cfg: dict[str, Any], built: set[str] = frozenset()) -> list[dict[str, Any]]:
    """A cell's trainings: each earlier stage (with a key naming what it computes, so cells that
    share it count it once, and whether it is `built`: it and every stage before it) and the run's
    own training, each with its steps and FLOPs."""
    method_cls = get_method(cfg["method"])
    k, tests = num_classes_of(cfg), test_images_of(cfg)
    parts, previous, cached = [], "", True
    for p in stage_plan(cfg, method_cls):
        # the run's own stage key, with the data and split named by the config (no data is read)
        key = stage_key(p.cfg, p.method_cls, previous, data_of(cfg), split_of(cfg))
        previous = key
        cached = cached and identity_of(p.cfg, p.method_cls) in built
        flops = p.cfg["steps"] * step_flops(p.cfg, p.method_cls, k)
        if p.method_cls.classifies:
            flops += eval_flops(p.cfg, k, tests)
        parts.append({"name": p.stage.name, "method": p.method_cls.name, "key": key, "steps": p.cfg["steps"],
                      "flops": flops, "cached": cached})
    if method_cls.own_training:
        parts.append({"name": "run", "method": method_cls.name, "key": None, "steps": cfg["steps"],
                      "flops": cfg["steps"] * step_flops(cfg, method_cls, k) + eval_flops(cfg, k, tests)})
    return parts


def built_stages(results_dir: Path) -> set[str]:
    """The identities of the stages built under `results_dir`, as `identity_of` writes them."""
    built = set()
    for scfg in built_stage_configs(results_dir):
        try:
            built.add(identity_of(scfg, get_method(scfg.get("method"))))
        except UsageError:
            continue  # a stage of a method not loaded here
    return built


def identity_of(scfg: dict[str, Any], method_cls) -> str:
    """A stage as far as a plan can tell it without reading data: its options and its data by name."""
    return json.dumps({**stage_identity(scfg, method_cls), "data": data_of(scfg)}, sort_keys=True, default=str)


def data_of(cfg: dict[str, Any]) -> str:
    """The data options of a config, standing in for the data's hash: the dataset and its files
    by name, not by path (a stage built with `../shared/data/x.tar.gz` is the one a study given
    `/work/shared/data/x.tar.gz` would build)."""
    def name(path: Any) -> Any:
        return Path(path).name if path else path
    return f"{cfg.get('dataset')}:{name(cfg.get('data'))}:{name(cfg.get('unlabeled_data'))}"


def split_of(cfg: dict[str, Any]) -> str:
    """The split options of a config, standing in for the split's hash."""
    from bench.run.stages import SPLIT_KEYS
    return json.dumps({k: cfg.get(k) for k in sorted(SPLIT_KEYS | {"seed"})}, default=str)


# -- the device's rate -------------------------------------------------------------------------
def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def rate_file() -> Path:
    """Where measured rates are kept: one file per user, whatever the data cache ($SSVIT_CACHE)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssvit-bench" / "throughput.json"


def device_rate(device: torch.device) -> tuple[float, str, Path, bool]:
    """(achieved FLOP/s of a training step, the device's label, the cache file, measured now):
    measured once per device and torch version on a small ViT (about two seconds), then read."""
    path = rate_file()
    label = f"{device_label(device)}; torch {torch.__version__}"
    try:
        known = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    entry = known.get(label)
    if entry and entry.get("format") == RATE_FORMAT:
        return float(entry["flop_per_s"]), label, path, False
    rate = _measure(device)
    known[label] = {"flop_per_s": rate, "format": RATE_FORMAT, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        atomic_write_text(path, json.dumps(known, indent=2) + "\n")
    except OSError:
        pass  # an unwritable cache only costs a measurement next time
    return rate, label, path, True


def _measure(device: torch.device) -> float:
    """FLOP/s of forward + backward + AdamW steps of the cpu preset's ViT (32 px, 64 patches of
    4 px, width 96, depth 6) at batch 32: small enough for any device."""
    cfg = {"encoder": "vit_small_patch16_224", "img_size": 32, "patch_size": 4, "depth": 6, "embed_dim": 96,
           "num_heads": 3}
    torch.manual_seed(0)
    model = build_model(cfg, 10, with_decoder=False).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(32, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    flops = 3 * 32 * forward_flops(cfg, 10)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < 1.5:
        step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return flops * steps / (time.perf_counter() - start)


# -- the plan -----------------------------------------------------------------------------------
def hours(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def describe(spec, dataset: str, preset: str | None, preset_note: str, cells: list, cfgs: list[dict[str, Any]],
             recorded: set[str], built: set[str], rate: tuple[float, str, Path, bool], workers: int = 1) -> str:
    """The plan as text: the grid, shared stages, what is recorded, the time, the cuts, the thresholds."""
    flop_per_s, label, rate_file, _ = rate
    lines = [f"plan: study {spec.name} on {dataset} at preset {preset or 'none (the built-in defaults)'}"
             + (f" ({preset_note})" if preset_note else "")]
    axes = list(spec.axes)
    seeds = sorted({c.seed for c in cells})
    by_method = Counter(c.method for c in cells)
    lines.append(f"  cells: {len(cells)} = " + " + ".join(f"{n} {m}" for m, n in by_method.items())
                 + f" ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
                 + "".join(f" x {len(spec.axes[a]['values'])} {a}" for a in axes) + ")")
    stages: dict[str, dict[str, Any]] = {}
    total, todo, per_method = 0.0, 0.0, defaultdict(float)
    # a stage not built is charged to the first cell still to run that needs it (a fresh machine
    # resuming from run records rebuilds the stages of the cells it runs)
    pending_first = sorted(zip(cells, cfgs), key=lambda pair: pair[0].key in recorded)
    for cell, cfg in pending_first:
        seconds = CELL_START_S
        for part in cell_parts(cfg, built):
            t = 0.0 if part.get("cached") else OVERHEAD * part["flops"] / flop_per_s
            if part["key"] is not None:
                if part["key"] in stages:
                    stages[part["key"]]["cells"] += 1
                    continue
                stages[part["key"]] = {**part, "cells": 1, "seconds": t}
            seconds += t
        total += seconds
        per_method[cell.method] += seconds
        if cell.key not in recorded:
            todo += seconds
    shared = Counter((s["name"], s["method"], s["steps"]) for s in stages.values())
    for (name, method, steps), n in shared.items():
        same = [s for s in stages.values() if (s["name"], s["method"], s["steps"]) == (name, method, steps)]
        users, ready = sum(s["cells"] for s in same), sum(s["cached"] for s in same)
        lines.append(f"  stages: {n} {name} ({method}, {steps:,} steps each), shared by {users} cells from the cache"
                     + (f"; {ready} already built" if ready else ""))
    lines.append(f"  recorded: {len(recorded & {c.key for c in cells})} of {len(cells)} cells already finished")
    lines.append("  time by method (a shared stage counted once):")
    for method, n in by_method.items():
        lines.append(f"    {method:14s} {n:3d} cells  {hours(per_method[method])}")
    lines.append(f"  time: about {hours(todo / max(workers, 1))} for what is left"
                 + (f" ({hours(total)} for the whole grid)" if todo != total else "")
                 + f" on this device ({label}: {flop_per_s / 1e9:.1f} GFLOP/s measured on a training step, "
                 f"x{OVERHEAD} for what FLOPs do not count, {CELL_START_S:.0f} s to start each cell; the rate is "
                 f"cached in {rate_file})")
    cuts = []
    if len(by_method) > 1:
        cuts.append(f"--methods {' '.join(list(by_method)[:2])}")
    for a in axes:
        if len(spec.axes[a]["values"]) > 1:
            cuts.append(f"--values {a}={spec.axes[a]['values'][0]}")
    if len(seeds) > 1:
        cuts.append("--seeds 1")
    if cuts:
        lines.append("  to shrink it: " + ", ".join(cuts) + (", or another --preset" if preset != "smoke" else ""))
    thresholds = _thresholds(cells, cfgs)
    if thresholds:
        lines.append("  thresholds: " + "; ".join(thresholds))
    return "\n".join(lines)


def _thresholds(cells: list, cfgs: list[dict[str, Any]]) -> list[str]:
    """Each pseudo-labelling method's threshold; from scratch at 0.95 a ViT admits next to nothing
    (the threshold_onset study), which the plan says before the cells run."""
    out, seen = [], set()
    for cell, cfg in zip(cells, cfgs):
        method_cls = get_method(cfg["method"])
        option = method_cls.threshold_option
        if option is None or cell.method in seen:
            continue
        seen.add(cell.method)
        tau = cfg[option]
        note = ""
        if cfg.get("threshold_policy", "fixed") in ("fixed", "align") and tau >= 0.9 and cfg.get("start") != "mae" \
                and method_cls.name not in ("semi_vit",):
            note = " (from scratch a ViT admits next to nothing at this threshold: see the threshold_onset study)"
        out.append(f"{cell.method} {option} {tau:g} ({cfg.get('threshold_policy', 'fixed')}){note}")
    return out


def auto_preset(launcher: str, slurm: dict[str, str]) -> tuple[str, str]:
    """The preset a study without one runs: what this device (or the SLURM workers' GPUs) can
    finish: `fast` on a GPU, `cpu` on a CPU. Returns (preset, why)."""
    gpus = any(k in slurm for k in ("gpus_per_node", "gpus_per_task", "gres", "gpus"))
    if launcher == "slurm":
        return ("fast", "chosen for the SLURM workers' GPUs") if gpus else ("cpu", "chosen for CPU SLURM workers")
    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "":
        return "fast", "chosen for this GPU: no --preset given"
    return "cpu", "chosen for this CPU: no --preset given"
