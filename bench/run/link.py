"""What a study worker tells the run it starts, as one value.

A `bench study` worker runs each cell as a `bench run` process and needs three things back from
it: the trial the run belongs to (kept in the run's info), the run's id as soon as the run exists
(so a retry after the worker dies can resume it), and the run's progress (its display). The
worker sets them in the environment of the process (`to_env`); the CLI reads them once at its
entry (`from_env`) and hands the link to the run. Nothing deeper reads the environment.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from bench.distributed import world
from bench.io import atomic_write_text

TRIAL, RUN_ID_FILE, PROGRESS_FILE = "SSVIT_TRIAL", "SSVIT_RUN_ID_FILE", "SSVIT_PROGRESS_FILE"


@dataclass(frozen=True)
class StudyLink:
    trial: dict[str, Any] | None = None   # the study, trial number, storage and cell of the run
    run_id_file: Path | None = None       # written with the run's id as soon as the run exists
    progress_file: Path | None = None     # kept current with the run's step, ETA, validation accuracy

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "StudyLink":
        return cls(json.loads(env[TRIAL]) if env.get(TRIAL) else None,
                   Path(env[RUN_ID_FILE]) if env.get(RUN_ID_FILE) else None,
                   Path(env[PROGRESS_FILE]) if env.get(PROGRESS_FILE) else None)

    def to_env(self) -> dict[str, str]:
        out = {TRIAL: json.dumps(self.trial)} if self.trial else {}
        if self.run_id_file:
            out[RUN_ID_FILE] = str(self.run_id_file)
        if self.progress_file:
            out[PROGRESS_FILE] = str(self.progress_file)
        return out

    def announce(self, run_id: str) -> None:
        """The run exists: its worker learns its id (rank 0)."""
        if self.run_id_file and world().is_main:
            atomic_write_text(self.run_id_file, run_id)

    def report(self, stage: str, progress: dict[str, Any]) -> None:
        """The run's progress for the worker's display (rank 0); a failed write is ignored."""
        if not self.progress_file or not world().is_main:
            return
        try:
            atomic_write_text(self.progress_file, json.dumps({"stage": stage, **progress}))
        except OSError:
            pass  # the display is a convenience; the run goes on without it


NO_LINK = StudyLink()
