"""One tracked run, start to finish: data -> split -> checks -> Sacred run -> Trainer.

Everything that can reject the input (config, data, split, resume target, results directory)
happens before the Sacred run directory is created, so bad input writes nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.train import checkpoint
from bench.config import differing_keys
from bench.data.sources import load_for, prepare_cache_dir
from bench.distributed import broadcast, pick_device, world
from bench.distributed.faults import recording_failure
from bench.train.trainer import Trainer
from bench.errors import Interrupted, PeerLost, RunStopped, UsageError
from bench.io import atomic_write_text, read_json
from bench.method.base import get_method
from bench.model.vit_mae import build_model
from bench.model.pretrained import load_into
from bench.data.split_files import check_budget, read_split_file
from bench.data.splits import split_for
from bench.method.stage import describe_start
from bench.run.stages import StageCurves, plan, run_stage, save_final, stage_curves, stage_key, stage_result
from bench.run.tracking import RunHandle, SacredInterrupt, mongo_observer, prepare_runs_dir, runs_dir, tracked_run


def find_run_dir(results_dir: str | Path, run: str) -> Path:
    """A run given as an id under <results_dir>/runs or as a path to its directory."""
    candidates = [runs_dir(results_dir) / run, Path(run)]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    raise UsageError(f"--resume {run}: no run directory with a config.json at "
                     f"{' or '.join(map(str, candidates))}; give a run id or path")


def check_feasible(cfg: dict[str, Any], data, cache_dir: Path):
    """The run's split, once the method and each of its earlier stages have confirmed that the
    config lets them work (e.g. that a pseudo-label can be admitted at all, that a stage has
    steps to run); UsageError otherwise."""
    labeled_from, info = None, None
    if cfg.get("split_file"):
        labeled_from, info = read_split_file(cfg["split_file"], data.train_files, data.train_y, data.classes,
                                             cfg["split_format"])
        check_budget(info, len(data.train_y), cfg["label_fraction"], cfg["labels_per_class"])
    split = split_for(cfg, data.train_y, data.num_classes, data.source_hash, cache_dir, labeled_from, info)
    method_cls = get_method(cfg["method"])
    method_cls.check(cfg, data.num_classes, split)
    for p in plan(cfg, method_cls):  # a stage's options are checked as the stage reads them
        p.method_cls.check(p.cfg, data.num_classes, split)
    return split


def check_resumable(cfg: dict[str, Any], run_dir: Path) -> int:
    """The checkpoint step to resume `run_dir` from; UsageError when it cannot be resumed."""
    stored = json.loads((run_dir / "config.json").read_text())
    diff = differing_keys(cfg, stored)
    if diff:
        shown = ", ".join(f"{k}={stored.get(k)!r} (now {cfg.get(k)!r})" for k in diff[:4])
        raise UsageError(f"cannot resume run {run_dir.name}: its config differs in {shown}; "
                         f"pass the original options or start a new run")
    status = json.loads((run_dir / "run.json").read_text()).get("status") if (run_dir / "run.json").exists() else None
    if status == "COMPLETED":
        raise UsageError(f"run {run_dir.name} already COMPLETED; start a new run instead of --resume")
    if not get_method(cfg["method"]).own_training:
        return 0  # its training is a stage, which resumes from its own checkpoint
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file():
        raise UsageError(f"run {run_dir.name} has no checkpoint to resume from; start it anew")
    return checkpoint.saved_step(ckpt)


def check_world(cfg: dict[str, Any], world_size: int) -> None:
    """Every per-step count of the run and its stages must split evenly over the ranks: each rank
    computes an equal slice of the global batch."""
    if world_size <= 1:
        return
    method_cls = get_method(cfg["method"])
    counts = step_counts(cfg, method_cls, "")
    for p in plan(cfg, method_cls):
        counts += step_counts(p.cfg, p.method_cls, p.stage.prefix)
    for name, n in counts:
        if n % world_size:
            raise UsageError(f"{name} gives {n} images per step, which {world_size} ranks cannot share equally "
                             f"(the batch is global); make it a multiple of {world_size}")


def check_store(cfg: dict[str, Any], data) -> str:
    """The store the run's images will live in (recorded with the run); a streamed store needs
    the on-disk cache that ImageNet and `--image-side` build."""
    import numpy as np
    from bench.data.store import choose
    return choose(cfg["store"], data.train_x.nbytes + data.test_x.nbytes, pick_device(cfg["device"]),
                  isinstance(data.train_x, np.memmap))


def step_counts(cfg: dict[str, Any], method_cls, prefix: str) -> list[tuple[str, int]]:
    """(the options behind it, images) for the labeled and unlabeled parts of a step."""
    flag = f"--{prefix.replace('_', '-')}batch-size"
    out = [(flag, cfg["batch_size"])] if method_cls.uses_labeled else []
    if method_cls.uses_unlabeled:
        name = f"--{prefix.replace('_', '-')}mu x {flag}" if "mu" in cfg else flag
        out.append((name, method_cls.unlabeled_batch_size(cfg)))
    return out


class Follower:
    """What a rank other than 0 holds of the tracked run: its id and directory. It writes
    nothing: the run record, metrics, checkpoints and stages are rank 0's."""

    def __init__(self, run_id: str, run_dir: str):
        self.id, self.dir = run_id, Path(run_dir)

    def log_scalar(self, name: str, value: float, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def set_info(self, key: str, value: Any) -> None:
        pass


@dataclass
class Prepared:
    """A run's inputs once every check has passed (nothing written yet)."""
    cfg: dict[str, Any]
    method_cls: type
    data: Any
    split: Any
    resume_at: tuple[str, int] | None
    observers: list
    init: tuple[dict, dict] | None = None  # --init-from: (weights, what was loaded)


def initial_weights(cfg: dict[str, Any], num_classes: int) -> tuple[dict, dict]:
    """`--init-from`'s encoder in a model of the run's architecture (strict: every encoder tensor
    from the file), as stage weights; and what was loaded, for the run record."""
    model = build_model(cfg, num_classes, with_decoder=True)
    info = load_into(cfg["init_from"], model)
    # only what came from the file travels on (an MAE or timm file's decoder is not read)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("decoder.") or "decoder" in info.get("loaded", [])}
    return {"model": state, "ema": state}, info


def prepare(cfg: dict[str, Any], resume: str | None, world_size: int) -> Prepared:
    """Everything that can reject a run, before anything is written: the world's batch split,
    the device, the resume target, Mongo, the data, the split and what the method needs of it,
    the model. `bench run --nproc` calls it before it starts any rank."""
    method_cls = get_method(cfg["method"])
    check_world(cfg, world_size)
    pick_device(cfg["device"])
    # Cheap checks first, then the data (which may download and decode), then the model.
    resume_at = None
    if resume is not None:
        run_dir = find_run_dir(cfg["results_dir"], resume)
        resume_at = (run_dir.name, check_resumable(cfg, run_dir))
        cfg = {**cfg, "results_dir": str(run_dir.parent.parent)}
    observers = [mongo_observer(cfg["mongo"])] if cfg["mongo"] and world().is_main else []
    cache_dir = prepare_cache_dir(cfg["cache_dir"])
    data = load_for(cfg, cache_dir, progress=cfg["progress"] and world().is_main)
    split = check_feasible(cfg, data, cache_dir)
    if split.key.get("split_file") and world().is_main:
        f = split.key["split_file"]
        print(f"split file {cfg['split_file']} ({f['format']}): {f['images']} labeled images, {f['per_class_min']}-"
              f"{f['per_class_max']} per class in {f['classes_with_labels']} classes; validation from the "
              f"{cfg['val_from']} images", flush=True)
    cfg = {**cfg, "store_used": check_store(cfg, data)}
    with torch.device("meta"):  # a model the options cannot build is rejected before any write
        build_model(cfg, data.num_classes, with_decoder=method_cls.uses_decoder)
    init = initial_weights(cfg, data.num_classes) if cfg.get("init_from") else None
    if world_size > 1:  # what each rank computes of the global batch, recorded with the run
        cfg = {**cfg, "world_size": world_size,
               "rank_batch": {"labeled": (cfg["batch_size"] if method_cls.uses_labeled else 0) // world_size,
                              "unlabeled": method_cls.unlabeled_batch_size(cfg) // world_size}}
    return Prepared(cfg, method_cls, data, split, resume_at, observers, init)


def execute(cfg: dict[str, Any], resume: str | None = None, log=print, on_validation=None,
            info: dict | None = None) -> tuple[str, dict]:
    """Run the method of `cfg` as one tracked run; returns (run id, result). In a distributed
    world every rank calls this: rank 0 records the run, the others follow it."""
    w = world()
    p = prepare(cfg, resume, w.size)
    cfg, method_cls, data, split, resume_at = p.cfg, p.method_cls, p.data, p.split, p.resume_at
    if w.is_main:
        prepare_runs_dir(cfg["results_dir"])

    def main(run: RunHandle | Follower) -> dict:
        if w.distributed and w.is_main:
            broadcast((run.id, str(run.dir)))  # the followers learn where the run lives
        if os.environ.get("SSVIT_TRIAL"):
            run.set_info("optuna", json.loads(os.environ["SSVIT_TRIAL"]))
        run.set_info("split_hash", split.hash)
        run.set_info("dataset_hash", data.source_hash)
        run.set_info("checkpoint", str((run.dir / "checkpoint.pt").resolve()))
        if w.is_main:
            log(f"run {run.id}: {cfg['method']} on {cfg['dataset']} -> {run.dir}"
                + (f" ({w.size} ranks)" if w.distributed else ""))
        try:
            if os.environ.get("SSVIT_RUN_ID_FILE") and w.is_main:  # a study worker links its trial to this run
                atomic_write_text(os.environ["SSVIT_RUN_ID_FILE"], run.id)
            if w.is_main:
                atomic_write_text(run.dir / "split.json", split.to_json())
            if p.init is not None:
                run.set_info("init_from", p.init[1])
            run.set_info("start", start_of(cfg, method_cls, p.init))
            if cfg.get("pl_mode") == "oracle":
                run.set_info("oracle", "a diagnostic: its pseudo-labels are the true labels under its own admission mask")
            weights, keep_head, stages, own = train_stages(cfg, method_cls, data, split, run, p.init, on_validation)
            start = time.perf_counter()
            if own is not None:  # the run's training is its last stage (trained now, or reused)
                result = own
            else:
                trainer = Trainer(cfg, method_cls, data, split, run.dir, log=run.log_scalar, flush=run.flush,
                                  on_validation=on_validation, warn=run.warn, on_progress=progress_writer(""))
                if resume_at is not None:
                    trainer.load_state_dict(checkpoint.load(trainer.ckpt_path))
                    run.set_info("resumed_from_step", trainer.step)
                elif weights is not None:
                    trainer.init_from(weights, keep_head, method_cls.ema_from_stage(cfg))
                    run.set_info("init", trainer.init)
                result = trainer.run(progress=cfg["progress"])
        except BaseException as e:
            recording_failure()
            lost = w.distributed and is_peer_failure(e)
            # a run stopped on purpose (a pruned trial: Sacred records its own status) failed nothing
            key = "stopped" if isinstance(e, SacredInterrupt) else "failure"
            run.set_info(key, f"PeerLost: {peer_reason(e)}" if lost else f"{type(e).__name__}: {e}".strip().rstrip(":"))
            try:
                run.flush()  # the reason and the last curve points reach the store
            except Exception:
                pass
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted(f"run {run.id} stopped; {kept(run.dir, run.id)}") from None
            if lost:
                raise PeerLost(f"run {run.id} stopped: {peer_reason(e)}; {kept(run.dir, run.id)} (with any "
                               f"number of ranks)") from None
            if isinstance(e, OSError) and w.is_main:
                where = Path(e.filename).parent if e.filename else run.dir
                raise RunStopped(f"run {run.id} stopped: cannot write to {where} ({e.strerror or e}); "
                                 f"{kept(run.dir, run.id)} once the directory is writable again") from None
            raise
        # this run's own steps (a stage's: the minutes it took to train); its earlier stages' cost
        # (cached or not) is reported beside it
        if own is None:
            result["minutes"] = (time.perf_counter() - start) / 60
        result["stage_minutes"] = sum(s["minutes"] for s in stages.values())
        # a list: the record's JSON sorts mapping keys, and a stage's place in the pipeline matters
        result["stages"] = [{"name": name, "minutes": s["minutes"], "reused": s["reused"], "budget": s["budget"]}
                            for name, s in stages.items()]
        run.flush()  # cout.txt ends with the progress bar's final state, not the last checkpoint's
        return result

    if not w.is_main:
        run_id, run_dir = broadcast(None)
        return run_id, main(Follower(run_id, run_dir))
    return tracked_run(cfg, main, resume=resume_at, info=info, observers=p.observers)


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


def progress_writer(stage: str):
    """Where a study worker runs this process, a callback that keeps $SSVIT_PROGRESS_FILE
    current (the study's display reads it); otherwise None."""
    path = os.environ.get("SSVIT_PROGRESS_FILE")
    if not path or not world().is_main:
        return None

    def write(progress: dict) -> None:
        try:
            atomic_write_text(path, json.dumps({"stage": stage, **progress}))
        except OSError:
            pass  # the display is a convenience; the run goes on without it
    return write


def kept(run_dir: Path, run_id: str) -> str:
    """What a stopped run leaves behind, and how to continue it."""
    try:
        step = checkpoint.saved_step(run_dir / "checkpoint.pt")
    except Exception:  # missing or unreadable: nothing to resume from
        return "finished stages are cached; start the run again to continue"
    return f"its checkpoint at step {step} is kept; continue with `--resume {run_id}`"


def start_of(cfg: dict[str, Any], method_cls, init: tuple[dict, dict] | None) -> str:
    """Where the run's weights start, in words (the record's `start`)."""
    if init is not None:
        return f"file {Path(init[1]['file']).name} (sha256 {init[1]['sha256'][:12]})"
    return describe_start(cfg, method_cls)


def train_stages(cfg: dict[str, Any], method_cls, data, split, run: RunHandle, init: tuple[dict, dict] | None = None,
                 on_validation=None):
    """Train (or reuse from the stage cache) the run's planned stages, in order; returns the last
    stage's weights, whether its classifier head carries over, per earlier stage its cache key,
    whether it was reused, the minutes it took to train (by this run or an earlier one) and its
    budget, and, for a method whose training is its last stage, that stage's result (else None)."""
    weights, keep_head, previous = None, False, None
    if init is not None:  # a weight file stands in for MAE pretraining (the suite's own: with its head)
        weights, keep_head, previous = init[0], init[1].get("head_loaded", False), f"init:{init[1]['sha256']}"
    planned = plan(cfg, method_cls)
    stages_info: dict[str, dict] = {}
    own = None
    for i, p in enumerate(planned):
        is_own = not method_cls.own_training and i == len(planned) - 1
        key = stage_key(p.cfg, p.method_cls, previous, data.source_hash, split.hash)
        stage_dir = Path(cfg["results_dir"]) / "stages" / key
        job = StageJob(p, data, split, run, weights, keep_head, own=is_own, on_validation=on_validation,
                       progress=cfg["progress"])
        weights, reused = run_stage(stage_dir, job.train)
        keep_head, previous = p.stage.keep_head, key
        done = stage_result(stage_dir)
        if is_own:
            own = {**done, "stage_key": key, "reused": reused}
            if reused:
                job.replay(stage_dir)
            continue
        stages_info[p.stage.name] = {"key": key, "dir": str(stage_dir.resolve()), "reused": reused,
                                     "minutes": done.get("minutes", 0.0), "budget": done.get("budget", {})}
        run.set_info("stages", stages_info)
    return weights, keep_head, stages_info, own


class StageJob:
    """One stage's training for a run: a Trainer on the stage's config in the stage's folder,
    started from the previous stage's weights (or resumed from its own checkpoint), its curves
    logged into the run (prefixed by the stage's name, unless it is the run's own training) and
    kept in the stage's folder."""

    def __init__(self, planned, data, split, run, prior, keep_head: bool, own: bool, on_validation, progress: bool):
        self.p, self.data, self.split, self.run = planned, data, split, run
        self.prior, self.keep_head, self.own = prior, keep_head, own
        self.on_validation, self.progress = (on_validation if own else None), progress
        self.prefix = "" if own else f"{planned.stage.name}."

    def train(self, stage_dir: Path) -> None:
        p = self.p
        ckpt = stage_dir / "checkpoint.pt"
        resume_step = checkpoint.saved_step(ckpt) if broadcast(ckpt.exists()) and world().is_main else None
        resume_step = broadcast(resume_step)
        curves = StageCurves(stage_dir, resume_step)

        def log(name: str, value: float, step: int) -> None:
            curves.log(name, value, step)
            self.run.log_scalar(self.prefix + name, value, step)

        def flush() -> None:
            curves.flush()
            self.run.flush()

        trainer = Trainer(p.cfg, p.method_cls, self.data, self.split, stage_dir, log=log, flush=flush,
                          on_validation=self.on_validation, warn=self.run.warn if self.own else (lambda m: None),
                          on_progress=progress_writer("" if self.own else p.stage.name))
        if resume_step is not None:  # an interrupted stage continues where it stopped
            trainer.load_state_dict(checkpoint.load(trainer.ckpt_path))
        elif self.prior is not None:
            trainer.init_from(self.prior, self.keep_head)
        start = time.perf_counter()
        result = trainer.run(progress=self.progress)
        result["minutes"] = (time.perf_counter() - start) / 60
        if world().is_main:
            curves.flush()
            save_final(stage_dir, trainer.model, trainer.ema.model, p.cfg, result, trainer.init)
        if self.own:
            self.run.set_info("init", trainer.init)
            self.keep_selected(stage_dir)

    def keep_selected(self, stage_dir: Path) -> None:
        """The run's own training is a stage: its validation-selected model also lives in the run."""
        if world().is_main and (stage_dir / "selected.pt").is_file():
            shutil.copyfile(stage_dir / "selected.pt", self.run.dir / "selected.pt")

    def replay(self, stage_dir: Path) -> None:
        """A reused stage that is the run's training: its curves and selected model become the run's."""
        for name, series in stage_curves(stage_dir).items():
            for step, value in zip(series["steps"], series["values"]):
                self.run.log_scalar(name, value, step)
        info = read_json(stage_dir / "stage.json").get("init")
        if info:
            self.run.set_info("init", info)
        self.keep_selected(stage_dir)
