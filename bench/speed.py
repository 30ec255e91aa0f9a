"""`bench speed`: steady-state throughput of every method's training step on this machine.

Per method: images consumed per second (labeled + unlabeled), step time, FLOPs of one step
(torch's flop counter, forward + backward), achieved TFLOP/s and MFU against a peak, peak GPU
memory, and the share of the step spent making views (the recorded view calls of one step,
timed alone). Runs on CPU too; CPU rows are labelled as such.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.config import resolve
from bench.data import make_synthetic
from bench.engine import Trainer
from bench.errors import UsageError
from bench.io import atomic_write_text
from bench.method import get_method, method_names
from bench.splits import make_split


class RecordedViews:
    """Wraps the run's Views: forwards every call and records (kind, input) for re-timing."""

    def __init__(self, views):
        self._views = views
        self.calls: list[tuple[str, torch.Tensor]] = []
        self.recording = False

    def __getattr__(self, name):
        attr = getattr(self._views, name)
        if name in ("weak", "strong", "mae", "eval"):
            def call(x, _f=attr, _n=name):
                if self.recording:
                    self.calls.append((_n, x))
                return _f(x)
            return call
        if name == "labeled":
            return lambda x, kind: getattr(self, kind)(x)
        return attr


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, preset: str | None, steps: int, warmup: int, overrides: dict[str, Any],
            peak_tflops: float, tmp: Path) -> dict[str, Any]:
    cls = get_method(method)
    cfg = resolve(cls, preset=preset, cli={**overrides, "progress": False})
    data = make_synthetic(classes=10, size=32, train_per_class=max(64, cfg["batch_size"] * 2), test_per_class=4)
    split = make_split(data.train_y, data.num_classes, label_fraction=0.5, seed=0)
    trainer = Trainer(cfg, cls, data, split, tmp)
    views = RecordedViews(trainer.views)
    trainer.method.views = views
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
    with FlopCounterMode(display=False) as counter:  # one eager step, forward + backward
        trainer.train_step()
    flops = counter.get_total_flops()
    views.recording = True
    trainer.train_step()
    views.recording = False
    _sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        for kind, x in views.calls:
            getattr(views._views, kind)(x)
    _sync(dev)
    view_s = (time.perf_counter() - start) / steps
    images = trainer.n_labeled + trainer.n_unlabeled
    tflops = flops / step_s / 1e12
    return {"method": method, "preset": preset or "default", "device": _device_name(dev),
            "img_per_s": images / step_s, "images_per_step": images, "step_ms": 1000 * step_s,
            "tflop_per_step": flops / 1e12, "tflop_per_s": tflops,
            "mfu_pct": 100 * tflops / peak_tflops if dev.type == "cuda" else float("nan"),
            "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan"),
            "views_pct": 100 * view_s / step_s, "compile": cfg["compile"], "amp": "bf16" if trainer.use_bf16 else "fp32"}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({torch.get_num_threads()} threads)"


def speed(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    import tempfile
    names = args.methods or method_names()
    for m in names:
        get_method(m)
    if args.steps < 1 or args.warmup < 0 or args.peak_tflops <= 0:
        raise UsageError("--steps must be >= 1, --warmup >= 0 and --peak-tflops > 0")
    if args.compile is not None:
        overrides = {**overrides, "compile": args.compile}
    rows = []
    for m in names:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(m, args.preset, args.steps, args.warmup, overrides, args.peak_tflops, Path(tmp)))
        r = rows[-1]
        print(f"{m:14s} {r['img_per_s']:10.0f} img/s  {r['step_ms']:8.1f} ms/step  {r['tflop_per_s']:7.2f} TFLOP/s"
              f"  views {r['views_pct']:4.1f}%", flush=True)
    table = pd.DataFrame(rows)
    cpu = not torch.cuda.is_available()
    title = f"bench speed, preset {args.preset or 'default'}, {rows[0]['device']}" + (" (CPU figures)" if cpu else "")
    print("\n" + title)
    print(table.drop(columns=["preset", "device"]).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    out = Path(args.results_dir) / "speed"
    stem = f"speed-{args.preset or 'default'}-{'cpu' if cpu else 'cuda'}"
    atomic_write_text(out / f"{stem}.csv", table.to_csv(index=False))
    atomic_write_text(out / f"{stem}.json", json.dumps({"title": title, "rows": rows}, indent=2))
    print(f"written to {out / stem}.csv and .json")
    return 0
