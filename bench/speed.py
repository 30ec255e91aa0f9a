"""`bench speed`: steady-state throughput of training steps on this machine.

Per workload (a method at a preset, with overrides): images consumed per second (labeled +
unlabeled), step time, FLOPs of one step (torch's flop counter, forward + backward), achieved
TFLOP/s and MFU against a peak, peak GPU memory, and the share of the step spent making views
(the recorded view calls of one step, timed alone). A suite file adds reference figures and
targets, and the verdict per row. Runs on CPU too; CPU rows are labelled as such.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from bench.config import resolve, shipped_or_file
from bench.data.sources import make_synthetic
from bench.train.trainer import Trainer
from bench.errors import UsageError
from bench.io import atomic_write_text
from bench.method.base import get_method, method_names
from bench.data.splits import make_split


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, preset: str | None, steps: int, warmup: int, overrides: dict[str, Any],
            peak_tflops: float, tmp: Path, profile_steps: int = 0) -> tuple[dict[str, Any], str | None]:
    """One workload's row; with `profile_steps`, also torch.profiler's table of the operators
    and kernels that take the most time over that many steps."""
    cls = get_method(method)
    cfg = resolve(cls, preset=preset, cli={**overrides, "progress": False})
    per_class = max(64, cfg["batch_size"] * 2, (cfg["batch_size"] + cls.unlabeled_batch_size(cfg)) * 4 // 10)
    if cfg["store"] == "streamed":  # an on-disk cache of `image_side` images, read as a run reads it
        data = disk_dataset(cfg.get("image_side") or 256, 10 * per_class, tmp)
    else:
        data = make_synthetic(classes=10, size=32, train_per_class=per_class, test_per_class=4)
    split = make_split(data.train_y, data.num_classes, label_fraction=0.5, seed=0)
    trainer = Trainer(cfg, cls, data, split, tmp)
    trainer.method.steady_state()
    dev = trainer.device
    for _ in range(warmup):  # compilation, autotuning, allocator warm-up
        trainer.train_step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync(dev)
    step_s = (time.perf_counter() - start) / steps
    profile = _profile(trainer, profile_steps) if profile_steps else None
    # One eager step, forward + backward: compiled kernels would hide their FLOPs from the counter.
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        trainer.train_step()
    flops = counter.get_total_flops()
    with trainer.views.recording() as calls:
        trainer.train_step()
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        for kind, x in calls:
            getattr(trainer.views, kind)(x)
    _sync(dev)
    view_s = (time.perf_counter() - start) / steps
    images = trainer.n_labeled + trainer.n_unlabeled
    store = trainer.train_store
    read_img_s = wait_pct = float("nan")
    if store.kind == "streamed":  # what the store can deliver, beside what the step consumes
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for _ in range(steps):
            store.read(rng.choice(len(store), images, replace=False))
        read_img_s = steps * images / (time.perf_counter() - start)
        wait_pct = 100 * store.wait_s / (step_s * (warmup + steps + 2))
    tflops = flops / step_s / 1e12
    return {"method": method, "preset": preset or "default", "device": device_name(dev), "device_type": dev.type,
            "img_per_s": images / step_s, "images_per_step": images, "step_ms": 1000 * step_s,
            "tflop_per_step": flops / 1e12, "tflop_per_s": tflops,
            "mfu_pct": 100 * tflops / peak_tflops if dev.type == "cuda" else float("nan"),
            "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan"),
            "views_pct": 100 * view_s / step_s, "compile": cfg["compile"],
            "amp": "bf16" if trainer.use_bf16 else "fp32", "store": store.kind,
            "store_read_img_s": read_img_s, "store_wait_pct": wait_pct}, profile


def disk_dataset(side: int, n: int, tmp: Path):
    """A synthetic dataset of n images of side x side in an on-disk cache (for the streamed store)."""
    from bench.data.dataset import Dataset
    x = np.lib.format.open_memmap(tmp / "train_x.npy", mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
    rng = np.random.default_rng(0)
    for start in range(0, n, 256):
        x[start:start + 256] = rng.integers(0, 256, (min(256, n - start), side, side, 3), dtype=np.uint8)
    x.flush()
    np.save(tmp / "test_x.npy", x[:40])  # a cache file of its own: a store reads whole files
    train_x = np.load(tmp / "train_x.npy", mmap_mode="r")
    test_x = np.load(tmp / "test_x.npy", mmap_mode="r")
    y = np.arange(n, dtype=np.int64) % 10
    return Dataset("disk", [str(c) for c in range(10)], train_x, y, test_x, y[:40], f"disk-{side}-{n}")


def _profile(trainer: Trainer, steps: int) -> str:
    """The top operators and kernels by self time (device time on a GPU) over `steps` steps."""
    on_gpu = trainer.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
        _sync(trainer.device)
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    return f"{steps} training steps, sorted by {sort}\n" + prof.key_averages().table(sort_by=sort, row_limit=30)


SUITE_DIR = Path(__file__).parent / "speed_suites"


@dataclass
class Workload:
    name: str
    method: str
    preset: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    reference: dict[str, Any] = field(default_factory=dict)
    target: dict[str, float] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    workloads: list[Workload]
    peak_tflops: float | None = None
    views_pct_max: float | None = None


def load_suite(name: str) -> Suite:
    """A shipped suite (bench/speed_suites/<name>.yaml) or a suite YAML file."""
    path = shipped_or_file(SUITE_DIR, name, "speed suite")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"speed suite {path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("workloads"), list) or not spec["workloads"]:
        raise UsageError(f"speed suite {path}: expected a mapping with a non-empty 'workloads' list; fix the file")
    workloads = []
    for i, w in enumerate(spec["workloads"]):
        if not isinstance(w, dict) or "method" not in w:
            raise UsageError(f"speed suite {path}: workload {i + 1} needs at least 'method'; fix the file")
        get_method(w["method"])
        unknown = set(w) - {"name", "label", "method", "preset", "set", "reference", "target"}
        if unknown:
            raise UsageError(f"speed suite {path}: workload {i + 1} has unknown keys {sorted(unknown)}; fix the file")
        bad = set(w.get("target") or {}) - {"img_per_s", "mfu_pct"}
        if bad:
            raise UsageError(f"speed suite {path}: targets can be img_per_s and mfu_pct, not {sorted(bad)}")
        workloads.append(Workload(w.get("name", w["method"]), w["method"], w.get("preset"), dict(w.get("set") or {}),
                                  w.get("label", ""), dict(w.get("reference") or {}), dict(w.get("target") or {})))
    for key in ("peak_tflops", "views_pct_max"):
        _check_number(spec.get(key), f"speed suite {path}: {key}")
    for w in workloads:
        for where in ("reference", "target"):
            for k in ("img_per_s", "mfu_pct"):
                _check_number(getattr(w, where).get(k), f"speed suite {path}: {w.name} {where} {k}")
    return Suite(spec.get("name", path.stem), workloads, spec.get("peak_tflops"), spec.get("views_pct_max"))


def _check_number(value: Any, what: str) -> None:
    """A suite's numbers are optional; when given they must be positive numbers."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UsageError(f"{what} must be a number > 0, not {value!r}; fix the file")


def verdict(row: dict[str, Any], wl: Workload, views_pct_max: float | None, on_gpu: bool) -> str:
    """'met', 'MISSED: ...' or 'n/a on CPU' against the workload's targets."""
    if not (wl.target or views_pct_max is not None):
        return ""
    if not on_gpu:
        return "n/a on CPU"
    missed = [f"{k} {row[k]:.0f} < {v}" for k, v in wl.target.items() if not row[k] >= v]
    if views_pct_max is not None and not row["views_pct"] <= views_pct_max:
        missed.append(f"views {row['views_pct']:.1f}% > {views_pct_max}%")
    # a streamed store must not starve the step: gather + views within the same share
    if views_pct_max is not None and row.get("store") == "streamed" and \
            not row["views_pct"] + row["store_wait_pct"] <= views_pct_max:
        missed.append(f"views + store wait {row['views_pct'] + row['store_wait_pct']:.1f}% > {views_pct_max}%")
    return "MISSED: " + "; ".join(missed) if missed else "met"


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({torch.get_num_threads()} threads)"


ALLREDUCE_MODELS = {"ViT-S/16": ("vit_small_patch16_224", {}), "ViT-B/16": ("vit_base_patch16_224", {}),
                    "ViT-L/16": ("vit_large_patch16_224", {}), "ViT-H/14": ("vit_huge_patch14_224", {})}


def allreduce(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """One gradient all-reduce per step: its size for each model and its measured time here."""
    from bench.distributed import bandwidth
    if args.nproc < 2:
        raise UsageError("--allreduce needs --nproc >= 2 processes")
    models = dict(ALLREDUCE_MODELS)
    preset = args.preset or "cpu"
    cfg = resolve(get_method("supervised"), preset=preset, cli=overrides)
    sizes = {k: cfg[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size") if cfg.get(k)}
    models[f"preset {preset}"] = (cfg["encoder"], {"img_size": cfg["img_size"], "num_classes": 10, **sizes})
    elements = {name: bandwidth.gradient_elements(enc, **kw) for name, (enc, kw) in models.items()}
    rows = bandwidth.measure(list(elements.values()), world=args.nproc, repeats=args.steps)
    table = pd.DataFrame([{"model": name, "params_m": n / 1e6, **row} for (name, n), row in zip(elements.items(), rows)])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    stem = Path(args.results_dir) / "speed" / f"allreduce-{rows[0]['backend']}-{args.nproc}"
    atomic_write_text(stem.with_suffix(".csv"), table.to_csv(index=False))
    print(f"written to {stem}.csv")
    return 0


def speed(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    if args.allreduce:
        return allreduce(args, overrides)
    if args.steps < 1 or args.warmup < 0 or args.profile < 0 or (args.peak_tflops is not None and args.peak_tflops <= 0):
        raise UsageError("--steps must be >= 1, --warmup >= 0, --profile >= 0 and --peak-tflops > 0")
    if args.suite:
        if args.methods or args.preset:
            raise UsageError("--suite names its own methods and presets; drop --methods / --preset")
        suite = load_suite(args.suite)
    else:
        names, preset = args.methods or method_names(), args.preset or "smoke"
        for m in names:
            get_method(m)
        suite = Suite(Path(preset).stem, [Workload(m, m, preset) for m in names])
    peak = args.peak_tflops or suite.peak_tflops or 989.0
    if args.compile is not None:
        overrides = {**overrides, "compile": args.compile}
    for wl in suite.workloads:  # every config is valid before the first measurement
        resolve(get_method(wl.method), preset=wl.preset, cli={**wl.overrides, **overrides})
    out = Path(args.results_dir) / "speed"
    rows = []
    for wl in suite.workloads:
        with tempfile.TemporaryDirectory() as tmp:
            row, profile = measure(wl.method, wl.preset, args.steps, args.warmup, {**wl.overrides, **overrides},
                                   peak, Path(tmp), profile_steps=args.profile)
        if profile is not None:
            where = out / f"profile-{suite.name}-{wl.name}-{row['device_type']}.txt"
            atomic_write_text(where, profile)
            print(f"profile of {wl.name} written to {where}")
        row = {"workload": wl.name, **row, "reference_img_per_s": wl.reference.get("img_per_s", float("nan")),
               "target_img_per_s": wl.target.get("img_per_s", float("nan")),
               "verdict": verdict(row, wl, suite.views_pct_max, row["device_type"] == "cuda")}
        rows.append(row)
        print(f"{wl.name:24s} {row['img_per_s']:10.0f} img/s  {row['step_ms']:8.1f} ms/step  "
              f"{row['tflop_per_s']:7.2f} TFLOP/s  views {row['views_pct']:4.1f}%  {row['verdict']}", flush=True)
    table = pd.DataFrame(rows)
    on_gpu = any(r["device_type"] == "cuda" for r in rows)  # the device the steps ran on
    title = f"bench speed, {'suite' if args.suite else 'preset'} {suite.name}, {rows[0]['device']}" + ("" if on_gpu else " (CPU figures)")
    print("\n" + title)
    shown = table.drop(columns=["device", "device_type"]).replace("", float("nan")).dropna(axis=1, how="all")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    stem = f"speed-{suite.name}-{'cuda' if on_gpu else 'cpu'}"
    atomic_write_text(out / f"{stem}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{stem}.json", json.dumps({"title": title, "peak_tflops": peak,
                                                         "views_pct_max": suite.views_pct_max,
                                                         "workloads": [w.__dict__ for w in suite.workloads],
                                                         "rows": rows}, indent=2, default=str))
    print(f"written to {out / stem}.csv and .json")
    return 0
