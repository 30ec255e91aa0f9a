"""What `bench study` shows while it runs: one bar over the cells and, for each worker, its
running cell's stage, step, validation accuracy and ETA, as the run reports them in its
progress file (bench.run.link)."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from bench.study.spec import Cell


class SweepDisplay:
    def __init__(self, name: str, cells: int, done: int, workers: int, enabled: bool):
        self.bar = tqdm(total=cells, initial=done, desc=name, unit="cell", disable=not enabled)
        self.cell_bars = [tqdm(total=1, position=i + 1, leave=False, disable=not enabled,
                               bar_format="  {desc} {percentage:3.0f}%|{bar:20}| {n}/{total} {postfix}")
                          for i in range(workers)]

    def update(self, done: int, running: dict[int, tuple[Cell, Path]]) -> None:
        """`done` cells finished; `running`: each busy worker slot's cell and progress file."""
        self.bar.update(done - self.bar.n)
        for slot, b in enumerate(self.cell_bars):
            if slot not in running:
                b.set_description_str("idle", refresh=False)
                b.reset(total=1)
                continue
            cell, path = running[slot]
            try:
                p = json.loads(path.read_text())
            except (OSError, ValueError):
                p = {"stage": "starting", "step": 0, "steps": 1}
            b.total, b.n = max(int(p["steps"]), 1), int(p["step"])
            b.set_description_str(f"{cell.key}{' [' + p['stage'] + ']' if p.get('stage') else ''}", refresh=False)
            postfix = {}
            if p.get("val_acc") is not None:
                postfix["val"] = f"{p['val_acc']:.1f}"
            if p.get("eta_s") is not None:
                postfix["eta"] = tqdm.format_interval(p["eta_s"])
            b.set_postfix(postfix, refresh=False)
            b.refresh()

    def close(self) -> None:
        for b in self.cell_bars:
            b.close()
        self.bar.close()
