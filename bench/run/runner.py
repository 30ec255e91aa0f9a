"""One tracked run, start to finish, as flat steps: prepare (everything that can reject the
input, nothing written) -> open the record -> train the earlier stages -> train -> finish; a
failure at any point is recorded by one function.

Everything that can reject the input (config, data, split, resume target, results directory)
happens before the Sacred run directory is created, so bad input writes nothing. In a
distributed world every rank runs the same steps; rank 0 alone holds the record.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.distributed import broadcast, world
from bench.distributed.faults import recording_failure
from bench.errors import Interrupted, PeerLost, RunStopped
from bench.io import atomic_write_text
from bench.method.stage import describe_start
from bench.run.link import NO_LINK, StudyLink
from bench.run.prepare import Prepared, prepare
from bench.run.sinks import RecordSink
from bench.run.stages import train_stages
from bench.run.tracking import RunHandle, SacredInterrupt, prepare_runs_dir, tracked_run
from bench.train import checkpoint
from bench.train.trainer import Trainer

Validation = Callable[[int, dict], None]


def execute(cfg: dict[str, Any], resume: str | None = None, link: StudyLink = NO_LINK,
            on_validation: Validation | None = None, info: dict | None = None, log=print) -> tuple[str, dict]:
    """Run the method of `cfg` as one tracked run; returns (run id, result). `link`: what a study
    worker asked of the run; `on_validation`: each evaluation's validation accuracies (a search's
    pruner). In a distributed world every rank calls this: rank 0 records the run."""
    w = world()
    p = prepare(cfg, resume, w.size)
    if not w.is_main:  # a follower: the record is rank 0's
        run_id, run_dir = broadcast(None)
        return run_id, train_run(p, None, run_id, Path(run_dir), link, on_validation, log)
    prepare_runs_dir(p.cfg["results_dir"])

    def main(record: RunHandle) -> dict:
        if w.distributed:
            broadcast((record.id, str(record.dir)))  # the followers learn which run they are
        return train_run(p, record, record.id, record.dir, link, on_validation, log)
    return tracked_run(p.cfg, main, resume=p.resume_at, info=info, observers=p.observers)


def train_run(p: Prepared, record: RunHandle | None, run_id: str, run_dir: Path, link: StudyLink,
              on_validation: Validation | None, log) -> dict:
    """The run's steps after its record exists (`record` None on ranks other than 0)."""
    open_record(p, record, link, log)
    try:
        weights, keep_head, stages, own = train_stages(p, record, link, on_validation)
        start = time.perf_counter()
        result = own if own is not None else train(p, record, run_dir, link, on_validation, weights, keep_head)
    except BaseException as e:
        raise failure(e, record, run_id, run_dir) from None
    return finish(result, stages, record, None if own is not None else start)


def open_record(p: Prepared, record: RunHandle | None, link: StudyLink, log) -> None:
    """What the record holds before training: the trial, the split, the start, the runtime facts."""
    if record is None:
        return
    cfg = p.cfg
    if link.trial:
        record.set_info("optuna", link.trial)
    record.set_info("split_hash", p.split.hash)
    record.set_info("dataset_hash", p.data.source_hash)
    if p.data.checksum is not None:
        record.set_info("dataset_checksum", p.data.checksum)
        if not p.data.checksum["official"]:
            log(f"note: --data {cfg['data']} is named {p.data.checksum['file']} but its md5 "
                f"{p.data.checksum['md5']} is not the official {p.data.checksum['official_md5']}; recorded")
    record.set_info("checkpoint", str((record.dir / "checkpoint.pt").resolve()))
    record.set_info("runtime", p.runtime)
    w = world()
    log(f"run {record.id}: {cfg['method']} on {cfg['dataset']} -> {record.dir}"
        + (f" ({w.size} ranks)" if w.distributed else ""))
    link.announce(record.id)  # a study worker links its trial to this run
    atomic_write_text(record.dir / "split.json", p.split.to_json())
    if p.init is not None:
        record.set_info("init_from", p.init[1])
    record.set_info("start", start_of(p))
    if p.method_cls.plugin is not None:
        record.set_info("plugin", p.method_cls.plugin)
    if cfg.get("pl_mode") == "oracle":
        record.set_info("oracle", "a diagnostic: its pseudo-labels are the true labels under its own admission mask")


def start_of(p: Prepared) -> str:
    """Where the run's weights start, in words (the record's `start`)."""
    if p.init is not None:
        return f"file {Path(p.init[1]['file']).name} (sha256 {p.init[1]['sha256'][:12]})"
    return describe_start(p.cfg, p.method_cls)


def train(p: Prepared, record: RunHandle | None, run_dir: Path, link: StudyLink, on_validation: Validation | None,
          weights, keep_head: bool) -> dict:
    """The run's own training, from the last stage's weights or resumed from its checkpoint."""
    cfg = p.cfg
    sink = RecordSink(record, link, on_validation=on_validation)
    trainer = Trainer(cfg, p.method_cls, p.data, p.split, run_dir, sink=sink, store=p.runtime["store_used"])
    if p.resume_at is not None:
        trainer.load_state_dict(checkpoint.load(trainer.ckpt_path))
        if record is not None:
            record.set_info("resumed_from_step", trainer.step)
    elif weights is not None:
        trainer.init_from(weights, keep_head, p.method_cls.ema_from_stage(cfg))
        if record is not None:
            record.set_info("init", trainer.init)
    return trainer.run(progress=cfg["progress"])


def finish(result: dict, stages: dict[str, dict], record: RunHandle | None, start: float | None) -> dict:
    """The result with this run's minutes (a stage's: those it took to train) and its earlier
    stages' cost (cached or not) beside them."""
    if start is not None:
        result["minutes"] = (time.perf_counter() - start) / 60
    result["stage_minutes"] = sum(s["minutes"] for s in stages.values())
    # a list: the record's JSON sorts mapping keys, and a stage's place in the pipeline matters
    result["stages"] = [{"name": name, "minutes": s["minutes"], "reused": s["reused"], "budget": s["budget"]}
                        for name, s in stages.items()]
    if record is not None:
        record.flush()  # cout.txt ends with the progress bar's final state, not the last checkpoint's
    return result


def failure(e: BaseException, record: RunHandle | None, run_id: str, run_dir: Path) -> BaseException:
    """Record why the run stopped (a stop on purpose, a pruned trial, is not a failure) and the
    last curve points, and return the one-line error to raise in its place."""
    w = world()
    recording_failure()
    lost = w.distributed and is_peer_failure(e)
    if record is not None:
        key = "stopped" if isinstance(e, SacredInterrupt) else "failure"  # Sacred records a SacredInterrupt's status
        record.set_info(key, f"PeerLost: {peer_reason(e)}" if lost else f"{type(e).__name__}: {e}".strip().rstrip(":"))
        try:
            record.flush()  # the reason and the last curve points reach the store
        except Exception:
            pass
    if isinstance(e, KeyboardInterrupt):
        return Interrupted(f"run {run_id} stopped; {kept(run_dir, run_id)}")
    if lost:
        return PeerLost(f"run {run_id} stopped: {peer_reason(e)}; {kept(run_dir, run_id)} (with any number of ranks)")
    if isinstance(e, OSError) and w.is_main:
        where = Path(e.filename).parent if e.filename else run_dir
        return RunStopped(f"run {run_id} stopped: cannot write to {where} ({e.strerror or e}); "
                          f"{kept(run_dir, run_id)} once the directory is writable again")
    return e


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank is gone (or the launcher stopped this one)."""
    if isinstance(e, PeerLost) or isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(w in text for w in ("gloo", "Gloo", "NCCL", "Connection", "timed out"))


def peer_reason(e: BaseException) -> str:
    if isinstance(e, PeerLost):
        return str(e).split(";")[0]
    return f"another rank stopped responding ({str(e).splitlines()[0].split('] ')[-1][:120]})"


def kept(run_dir: Path, run_id: str) -> str:
    """What a stopped run leaves behind, and how to continue it."""
    try:
        step = checkpoint.saved_step(run_dir / "checkpoint.pt")
    except Exception:  # missing or unreadable: nothing to resume from
        return "finished stages are cached; start the run again to continue"
    return f"its checkpoint at step {step} is kept; continue with `--resume {run_id}`"


