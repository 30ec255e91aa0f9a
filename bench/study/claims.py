"""Who runs what: claims, heartbeats and stale trials over an Optuna storage, for `bench study`
and `bench tune` alike. Every call on Optuna's private storage API is here, in one place.

- A claim: a worker creates a trial, writes its heartbeat, then the cell key, and reads the
  trials back; if any other live claim on the cell exists it withdraws. Of two concurrent claims
  the later read always sees the other, so at most one proceeds.
- Heartbeats: a running trial refreshes a timestamp from a thread; a trial whose heartbeat is
  older than the grace period (4 heartbeats) belonged to a dead worker or tuner: it is failed, so
  its cell (or its place among --trials) is run again.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

HEARTBEATS_OF_GRACE = 4


def last_sign_of_life(t: FrozenTrial) -> float:
    """A trial's last heartbeat; a trial another worker has just asked for has none yet, and its
    start stands in (else a sweep of stale trials between `ask` and the first beat fails it)."""
    return t.system_attrs.get("heartbeat") or t.datetime_start.timestamp()


@dataclass
class Board:
    """Every cell's trials, read from the storage at one instant."""
    trials: dict[str, list[FrozenTrial]]
    now: float
    grace: float

    def live(self, t: FrozenTrial) -> bool:
        return t.state == TrialState.RUNNING and self.now - last_sign_of_life(t) <= self.grace

    def done(self, key: str) -> bool:
        return any(t.state == TrialState.COMPLETE for t in self.trials.get(key, []))

    def busy(self, key: str, mine: int | None = None) -> bool:
        return any(self.live(t) and t.number != mine for t in self.trials.get(key, []))

    def stale(self) -> list[FrozenTrial]:
        return [t for ts in self.trials.values() for t in ts if t.state == TrialState.RUNNING and not self.live(t)]


def read_board(study: optuna.Study, grace: float) -> Board:
    trials: dict[str, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("cell")
        if key is not None:
            trials.setdefault(key, []).append(t)
    return Board(trials, time.time(), grace)


def beat(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> None:
    """One heartbeat of a running trial."""
    study._storage.set_trial_system_attr(trial._trial_id, "heartbeat", time.time())


def note(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: Any) -> None:
    """A user attribute of any trial, running or not, this worker's or another's."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


class Heartbeat:
    """Refreshes a running trial's heartbeat from a thread while the block runs, so that another
    worker can tell a dead one's trial. A storage hiccup is skipped: the next beat retries."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float) -> None:
        self.study, self.trial, self.interval, self.stop = study, trial, interval, threading.Event()

    def _run(self) -> None:
        while True:
            try:
                beat(self.study, self.trial)
            except Exception:
                pass
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> "Heartbeat":
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def claim(study: optuna.Study, key: str, grace: float) -> optuna.Trial | None:
    """A trial that holds cell `key` for this worker, or None when another worker holds or has
    finished it (this claim is then withdrawn: a failed trial with no parameters and no value)."""
    trial = study.ask()
    beat(study, trial)
    trial.set_user_attr("cell", key)
    after = read_board(study, grace)
    if after.busy(key, mine=trial.number) or after.done(key):
        note(study, trial, "withdrawn", True)
        finish(study, trial, TrialState.FAIL, reason="claim withdrawn: another worker has this cell")
        return None
    return trial


def set_params(study: optuna.Study, trial: optuna.Trial, params: dict[str, tuple[Any, Any]]) -> None:
    """A claimed trial's parameters, {name: (value, distribution)} (how a dashboard plots the
    grid); a grid that changed since earlier trials keeps them in user attributes only."""
    try:
        for name, (value, distribution) in params.items():
            study._storage.set_trial_param(trial._trial_id, name, distribution.to_internal_repr(value), distribution)
    except ValueError:
        pass


def finish(study: optuna.Study, trial, state: TrialState, value: float | None = None, reason: str = "") -> None:
    """End a trial (a live `optuna.Trial` or a `FrozenTrial` of another worker)."""
    try:
        if reason:
            note(study, trial, "reason", reason)
        study.tell(trial.number, value if state == TrialState.COMPLETE else None, state=state)
    except (ValueError, RuntimeError):
        pass  # another worker finished it first (e.g. two workers failing one stale trial)


def fail_stale(study: optuna.Study, grace: float, reason: str) -> int:
    """Fail every running trial whose heartbeat stopped (its worker or tuner died); how many."""
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if time.time() - last_sign_of_life(t) > grace]
    for t in stale:
        finish(study, t, TrialState.FAIL, reason=reason)
    return len(stale)
