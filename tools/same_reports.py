"""Rebuild every published report from its run records at two commits and compare the tables.

    python tools/same_reports.py BEFORE [AFTER]

Each commit is checked out in a temporary git worktree; each runs the `bench report` commands
results/README.md gives, on its own copy of results/published/, and every table file (.csv,
.md, .tex) must come out byte for byte the same. AFTER defaults to the working tree. A refactor
that claims to change no published number shows it here.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPORTS = [  # the folders that keep run records, as results/README.md rebuilds them
    ["benchmark"],
    ["label_fraction", "--methods", "supervised", "mae_finetune", "fixmatch", "ssmae",
     "--values", "label_fraction=0.01,0.1"],
    ["few_label_threshold"],
    ["mask_ratio", "--methods", "ssmae", "semi_mae", "--values", "mask_ratio=0.5,0.75,0.9"],
    ["gate_threshold", "--values", "confidence=0.7", "--values", "gate_threshold=60,70,80"],
    ["results/published/tune/fixmatch-cifar10-cpu/tuned_fixmatch.yaml"],
]
TABLES = (".csv", ".md", ".tex")


def build(code: Path, out: Path) -> Path:
    shutil.copytree(REPO / "results" / "published", out / "published")
    env = {**os.environ, "PYTHONPATH": str(code)}
    for report in REPORTS:
        study = report[0].replace("results/published", str(out / "published"))
        cmd = [sys.executable, "-m", "bench.cli", "report", study, *report[1:], "--dataset", "cifar10", "--preset",
               "cpu", "--report-dir", str(out / "published"), "--results-dir", str(out / "results")]
        done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{code}: {' '.join(report)}: {done.stderr.strip().splitlines()[-1:]}")
    return out / "published"


def main() -> int:
    before, after = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {}
        for side, commit in (("before", before), ("after", after)):
            code = REPO
            if commit:
                code = tmp / f"code-{side}"
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(code), commit],
                               check=True, capture_output=True)
            trees[side] = build(code, tmp / side)
        files = sorted(p.relative_to(trees["before"]) for p in trees["before"].rglob("*")
                       if p.suffix in TABLES and "runs" not in p.parts)
        differ = [f for f in files if not (trees["after"] / f).exists()
                  or not filecmp.cmp(trees["before"] / f, trees["after"] / f, shallow=False)]
        for f in files:
            print(f"{'DIFFERS' if f in differ else 'same   '} {f}")
        for side in ("before", "after"):
            if (tmp / f"code-{side}").exists():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / f"code-{side}")],
                               capture_output=True)
    print(f"{len(files) - len(differ)} of {len(files)} table files the same")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
