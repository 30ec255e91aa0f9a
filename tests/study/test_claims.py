"""The claim protocol and heartbeats, on an in-memory Optuna storage: at most one live claim per
cell, a withdrawn claim that carries nothing, a dead worker's trial failed and its cell free."""
import time

import optuna
import pytest
from optuna.trial import TrialState

from bench.study import claims


@pytest.fixture
def study():
    return optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")


def test_a_second_claim_on_a_live_cell_is_withdrawn_and_carries_nothing(study):
    first = claims.claim(study, "m|seed=0", grace=60)
    assert first is not None
    assert claims.claim(study, "m|seed=0", grace=60) is None
    withdrawn = [t for t in study.get_trials() if t.user_attrs.get("withdrawn")]
    assert len(withdrawn) == 1
    (t,) = withdrawn
    assert t.state == TrialState.FAIL and t.value is None and t.params == {} and "withdrawn" in t.user_attrs["reason"]
    # another cell is free; a finished cell cannot be claimed again
    assert claims.claim(study, "m|seed=1", grace=60) is not None
    claims.finish(study, first, TrialState.COMPLETE, value=1.0)
    assert claims.claim(study, "m|seed=0", grace=60) is None
    board = claims.read_board(study, grace=60)
    assert board.done("m|seed=0") and not board.done("m|seed=1") and board.busy("m|seed=1")


def test_a_dead_workers_trial_is_failed_and_its_cell_claimed_again(study):
    dead = claims.claim(study, "m|seed=0", grace=0.2)
    time.sleep(0.5)                                     # no heartbeat within the grace period
    assert claims.read_board(study, grace=0.2).stale()[0].number == dead.number
    assert claims.fail_stale(study, 0.2, "worker lost") == 1
    (t,) = [t for t in study.get_trials() if t.number == dead.number]
    assert t.state == TrialState.FAIL and t.user_attrs["reason"] == "worker lost"
    assert claims.claim(study, "m|seed=0", grace=0.2) is not None


def test_a_heartbeat_keeps_a_long_trial_alive(study):
    trial = claims.claim(study, "m|seed=0", grace=0.6)
    with claims.Heartbeat(study, trial, interval=0.1):
        time.sleep(1.0)                                 # longer than the grace: only the beats keep it
        assert claims.fail_stale(study, 0.6, "lost") == 0
        assert claims.read_board(study, grace=0.6).busy("m|seed=0")
    time.sleep(0.8)
    assert claims.fail_stale(study, 0.6, "lost") == 1   # beats stopped with the block


def test_a_trial_just_asked_for_is_not_taken_for_a_dead_worker(study):
    """Between another worker's `ask` and its first heartbeat, its trial has no heartbeat yet: the
    trial's start is its first sign of life, so a sweep of stale trials leaves it running."""
    trial = study.ask()  # no beat yet, as inside claim()
    assert claims.fail_stale(study, 30.0, "worker lost") == 0
    assert study.get_trials(deepcopy=False)[trial.number].state == TrialState.RUNNING
    time.sleep(0.3)
    assert claims.fail_stale(study, 0.2, "worker lost") == 1  # and it does go stale in time
