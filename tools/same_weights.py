"""Train the same smoke runs at two commits and compare their final weights bit for bit.

    python tools/same_weights.py BEFORE [AFTER] [--methods M ...] [--nproc 2]

Each commit is checked out in a temporary git worktree and runs `bench run METHOD --preset
smoke` (and, with --nproc 2, the same run on two CPU ranks) on the same synthetic data; the
final checkpoints (or, for a method whose training is a cached stage, that stage's final
weights) must hold equal tensors. AFTER defaults to the working tree. A refactor that claims to
change nothing shows it here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ["supervised", "fixmatch", "flexmatch", "freematch", "semi_mae", "ssmae", "mae_finetune", "semi_vit"]
# options under which each method's every mechanism acts at the smoke scale: pseudo-labels are
# admitted, SSMAE's gate opens and its memory fills, the supervised branch mixes
ACTIVE = {"supervised": ["--mixup-alpha", "0.8", "--cutmix-alpha", "1.0", "--labeled-view", "strong"],
          "fixmatch": ["--tau", "0.3"], "flexmatch": ["--tau", "0.3"], "semi_mae": ["--tau", "0.3"],
          "semi_vit": ["--tau", "0.3"],
          "ssmae": ["--confidence", "0.3", "--gate-threshold", "0", "--gate-warmup-steps", "5", "--gate-every", "5"]}


def checkout(commit: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(where), commit], check=True,
                   capture_output=True)
    return where


def train(code: Path, method: str, results: Path, cache: Path, nproc: int) -> dict[str, torch.Tensor]:
    cmd = [sys.executable, "-m", "bench.cli", "run", method, "--preset", "smoke", "--no-progress", "--device", "cpu",
           "--results-dir", str(results), *ACTIVE.get(method, [])] + (["--nproc", str(nproc)] if nproc > 1 else [])
    env = {**os.environ, "SSVIT_CACHE": str(cache), "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{method} at {code}: {out.stderr.strip().splitlines()[-1:]}")
    run = max((p for p in (results / "runs").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    ckpt = run / "checkpoint.pt"
    if not ckpt.exists():  # its training is a cached stage
        key = json.loads((run / "run.json").read_text())["result"]["stage_key"]
        ckpt = results / "stages" / key / "final.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return {f"model.{k}": v for k, v in state["model"].items()} | {f"ema.{k}": v for k, v in state["ema"].items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?", default=None, help="a commit (default: the working tree)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--dropped", nargs="+", default=[], metavar="PREFIX",
                        help="tensors AFTER no longer holds on purpose (e.g. ema.decoder. ema.mae_norm.): "
                        "listed, and every other tensor must still be equal")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        codes = {"before": checkout(args.before, tmp / "before"),
                 "after": checkout(args.after, tmp / "after") if args.after else REPO}
        same = True
        for method in args.methods:
            states = {side: train(code, method, tmp / side / "results", tmp / "cache", args.nproc)
                      for side, code in codes.items()}
            a, b = states["before"], states["after"]
            dropped = sorted(k for k in a.keys() - b.keys() if k.startswith(tuple(args.dropped)))
            differ = sorted(k for k in (a.keys() | b.keys()) - set(dropped)
                            if k not in a or k not in b or not torch.equal(a[k], b[k]))
            same &= not differ
            print(f"{method:14s} nproc {args.nproc}: {len(b)} tensors, "
                  + ("bitwise equal" if not differ else f"{len(differ)} differ, e.g. {differ[:3]}")
                  + (f" ({len(dropped)} dropped on purpose)" if dropped else ""), flush=True)
        for side in ("before", "after"):
            if codes[side] != REPO:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(codes[side])],
                               capture_output=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
