"""The training loop shared by every method.

One step: reseed the step's randomness from (seed, step), take the step's indices from the
index streams (also a function of (seed, step)), gather the images on the device ->
`method.train_step` (views are made inside, on the device) -> backward, clip, AdamW step at the
scheduled lr, EMA update. Every `eval_every` steps the raw and EMA models are evaluated on
validation and test; the method sees validation only. Every `ckpt_every` steps (and at the end,
and on Ctrl-C) the whole state is checkpointed atomically, so `--resume` continues to the same
result as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from bench import checkpoint
from bench.batch import Batch, Images
from bench.budget import ForwardCounter
from bench.config import identity
from bench.data import Dataset
from bench.ema import EMA
from bench.errors import NonFiniteLoss, UsageError
from bench.evaluate import evaluate
from bench.method import Method, TrainData
from bench.model import build_model
from bench.optim import build_optimizer, lr_at, set_lr
from bench.pseudo import admission_logs
from bench.randomness import StepRandom
from bench.sampler import IndexStream
from bench.splits import Split
from bench.stages import digest, transfer
from bench.views import Views

LogFn = Callable[[str, float, int], None]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s); "
                         f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class Selection:
    """The evaluation point chosen on validation accuracy (raw or EMA model)."""
    step: int = -1
    model: str = ""
    val_acc: float = -1.0
    test_acc: float = float("nan")


@dataclass
class Trainer:
    cfg: dict[str, Any]
    method_cls: type[Method]
    data: Dataset
    split: Split
    run_dir: Path
    log: LogFn = lambda name, value, step: None
    flush: Callable[[], None] = lambda: None  # persist logged metrics (called before checkpoints)
    on_validation: Callable[[int, dict], None] | None = None  # sees validation accuracy only (pruning)
    warn: Callable[[str], None] = lambda message: None  # a health warning: shown and kept in the run's info
    on_progress: Callable[[dict], None] | None = None  # step, steps, val_acc, eta_s at each log flush
    step: int = 0
    selection: Selection = field(default_factory=Selection)
    last_eval: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.device = dev = pick_device(cfg["device"])
        self.random = StepRandom(cfg["seed"], dev)  # also seeds the model's initialisation
        # The whole dataset lives on the device as uint8; batches are gathered by index.
        self.train_x = torch.from_numpy(self.data.train_x).to(dev)
        self.train_y = torch.from_numpy(self.data.train_y).to(dev)
        self.test_x = torch.from_numpy(self.data.test_x).to(dev)
        self.test_y = torch.from_numpy(self.data.test_y).to(dev)
        idx = {k: torch.from_numpy(getattr(self.split, k)).to(dev) for k in ("labeled", "val", "unlabeled")}
        self.use_bf16 = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and dev.type == "cuda")
        self.model = build_model(cfg, self.data.num_classes, with_decoder=self.method_cls.uses_decoder).to(dev)
        self.ema = EMA(self.model, cfg["ema_decay"])
        self.forwards = ForwardCounter(self.model, self.ema.model)
        self.views = Views(cfg["img_size"], self.random, pad_frac=cfg["pad_frac"],
                           randaug_ops=cfg["randaug_ops"], randaug_mag=cfg["randaug_mag"],
                           randaug_prob=cfg["randaug_prob"], cutout_frac=cfg["cutout_frac"])
        # Methods see the labels of the labeled and validation splits only.
        visible = torch.full_like(self.train_y, -1)
        known = torch.cat([idx["labeled"], idx["val"]])
        visible[known] = self.train_y[known]
        train_data = TrainData(self.train_x, visible, idx["labeled"], idx["val"], idx["unlabeled"])
        self.method = self.method_cls(cfg, self.model, self.ema, self.views, self.data.num_classes, train_data,
                                      autocast=self.autocast)
        self.optimizer = build_optimizer(self.model, cfg)
        self.n_labeled = cfg["batch_size"] if self.method_cls.uses_labeled else 0
        self.n_unlabeled = self.method.unlabeled_batch_size()
        pool = self.split.unlabeled
        if self.method_cls.unlabeled_source == "all":  # label-free methods see every training image
            pool = np.arange(len(self.data.train_x))
        self.labeled = IndexStream(self.split.labeled, self.n_labeled, cfg["seed"], "labeled")
        self.unlabeled = IndexStream(pool, self.n_unlabeled, cfg["seed"], "unlabeled")
        if cfg["compile"] and dev.type == "cuda":
            self.model.compile()
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._finite = torch.ones((), dtype=torch.bool, device=dev)
        self._stop_requested = False
        self.admitted = False  # has any pseudo-label been used yet (semi-supervised methods)
        self.warned = False    # ... and if not by half the run, has the user been told
        self.init: dict[str, Any] = {}  # where the weights came from (an earlier stage), for the record

    # -- state ---------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def state_dict(self) -> dict[str, Any]:
        # No stream or generator state: what a step draws is a function of (seed, step).
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "forward_images": self.forwards.images, "init": dict(self.init),
                "selection": vars(self.selection).copy(),
                "last_eval": dict(self.last_eval), "config": identity(self.cfg),
                "health": (self.admitted, self.warned),
                # a Ctrl-C checkpoint falls inside a log window: keep its partial sums
                "log_window": ({k: v.cpu() for k, v in self._sums.items()}, self._count),
                "split_hash": self.split.hash}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != identity(self.cfg) or state["split_hash"] != self.split.hash:
            raise UsageError("the checkpoint was made with a different config or split; "
                             "resume with the original options or start a new run")
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self.forwards.images, self.init = state["forward_images"], dict(state["init"])
        self.selection = Selection(**state["selection"])
        self.last_eval = dict(state["last_eval"])
        self.admitted, self.warned = state["health"]
        sums, self._count = state["log_window"]
        self._sums = {k: v.to(self.device) for k, v in sums.items()}

    def init_from(self, weights: dict[str, Any], keep_head: bool) -> None:
        """Start from an earlier stage's weights (`bench.stages.transfer`): the encoder always,
        the classifier head when it carries over, else a fresh head; the EMA starts from the
        stage's EMA when the head is carried over (Semi-ViT), else from the loaded model."""
        transfer(weights["model"], self.model, keep_head)
        self.ema.copy_from(self.model)
        if keep_head:
            transfer(weights["ema"], self.ema.model, keep_head)
        model, ema = self.model.state_dict(), self.ema.model.state_dict()
        self.init = {"head": "stage's" if keep_head else "re-drawn (std 2e-5)",
                     "ema": "stage's EMA" if keep_head else "the loaded model",
                     "encoder_sha256": digest(model), "head_sha256": digest(model, "head"),
                     "ema_encoder_sha256": digest(ema), "ema_head_sha256": digest(ema, "head")}

    def save_checkpoint(self) -> None:
        self._check_finite()
        self.flush()  # metrics first: a kill between the two leaves no gap after resume
        checkpoint.save(self.ckpt_path, self.state_dict())

    # -- one step ------------------------------------------------------------------------------
    def autocast(self):
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def next_batch(self) -> tuple[Batch, torch.Tensor | None]:
        """The step's images (rows: labeled first, then unlabeled) and the unlabeled images'
        true labels, which stay in the engine."""
        batch, y_u = Batch(), None
        universe = self.n_labeled + self.n_unlabeled
        dev = self.device
        if self.n_labeled:
            idx_l = torch.from_numpy(self.labeled.at(self.step)).to(dev)
            rows = torch.arange(self.n_labeled, device=dev)
            batch.l = Images(self.train_x[idx_l], rows, self.n_labeled, universe)
            batch.y_l = self.train_y[idx_l]
        if self.n_unlabeled:
            idx_u = torch.from_numpy(self.unlabeled.at(self.step)).to(dev)
            rows = self.n_labeled + torch.arange(self.n_unlabeled, device=dev)
            batch.u, batch.idx_u = Images(self.train_x[idx_u], rows, self.n_unlabeled, universe), idx_u
            y_u = self.train_y[idx_u]
        return batch, y_u

    def train_step(self) -> None:
        self.model.train()
        self.random.begin(self.step)
        batch, y_u = self.next_batch()
        with self.autocast(), self.forwards.counting():
            loss, logs = self.method.train_step(batch)
        for name, pl in self.method.take_pseudo_labels().items():
            logs.update(admission_logs(pl, y_u, name))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg["clip_grad"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip_grad"])
        set_lr(self.optimizer, lr_at(self.step, self.cfg))
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        # Accumulate on the device: no host synchronisation inside the step.
        loss = loss.detach().float()
        self._finite &= torch.isfinite(loss)
        for k, v in {"loss": loss, **logs}.items():
            v = v.detach().float()  # a 2-vector is a (numerator, denominator) pair: see flush_logs
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._count += 1

    def budget(self) -> dict[str, float]:
        """What this training consumed: optimizer steps, labeled and unlabeled images drawn, and
        encoder forward passes in image equivalents (a masked pass counts its visible share)."""
        return {"steps": self.step, "labeled_images": self.step * self.n_labeled,
                "unlabeled_images": self.step * self.n_unlabeled, "forward_images": round(self.forwards.images)}

    def _check_finite(self) -> None:
        if not bool(self._finite):
            raise NonFiniteLoss(f"non-finite loss at or before step {self.step}; lower --lr, set "
                                f"--clip-grad, or check the data")

    def flush_logs(self, seconds: float) -> dict[str, float]:
        """Move accumulated step logs to the host (one sync per log interval) and record them."""
        if not self._count:
            return {}
        self._check_finite()
        values = {}
        for k, v in self._sums.items():
            if v.numel() == 2:  # ratio of window sums, e.g. pseudo-label precision
                num, den = v.tolist()
                if den > 0:
                    values[k] = num / den
            else:
                values[k] = float(v) / self._count
        images = self._count * (self.n_labeled + self.n_unlabeled)
        values["img_per_s"] = images / max(seconds, 1e-9)
        values["lr"] = lr_at(self.step - 1, self.cfg)
        for k, v in values.items():
            self.log(f"train.{k}", v, self.step)
        self._sums, self._count = {}, 0
        self._check_admission(values)
        return values

    def _check_admission(self, values: dict[str, float]) -> None:
        """A semi-supervised run that has used no pseudo-label by half its steps is a supervised
        run in disguise: say so once, while it runs."""
        if not self.method_cls.pseudo_labels or self.admitted or self.warned:
            return
        self.admitted = values.get("pl_rate", 0.0) > 0
        if not self.admitted and self.step >= self.cfg["steps"] // 2:
            self.warned = True
            self.warn(f"{self.cfg['method']}: no pseudo-label admitted in {self.step} of {self.cfg['steps']} "
                      f"steps; it is training as a supervised run (check --tau / --confidence, the gate, "
                      f"label smoothing)")

    # -- evaluation ----------------------------------------------------------------------------
    def _validation(self) -> dict:
        """Evaluation of the raw and EMA models on the validation split."""
        val_idx = self.method.data.val
        return {tag: evaluate(model, self.train_x[val_idx], self.train_y[val_idx], self.views.eval,
                              self.cfg["eval_batch_size"], self.autocast)
                for tag, model in (("raw", self.model), ("ema", self.ema.model))}

    def _method_reads(self, val: dict) -> None:
        for k, v in (self.method.on_validation(val, self.step) or {}).items():
            self.log(k, float(v), self.step)

    def validate(self) -> None:
        """A validation-only reading for the method (e.g. its gate), between evaluations; it
        takes no part in checkpoint selection, which needs the test accuracy of its point."""
        self._check_finite()
        self._method_reads(self._validation())

    def evaluate(self) -> dict[str, float]:
        self._check_finite()
        val = self._validation()
        test = {tag: evaluate(model, self.test_x, self.test_y, self.views.eval, self.cfg["eval_batch_size"],
                              self.autocast)
                for tag, model in (("raw", self.model), ("ema", self.ema.model))}
        self._method_reads(val)  # the method sees validation only
        metrics = {"val_acc": val["raw"].acc, "val_acc_ema": val["ema"].acc,
                   "test_acc": test["raw"].acc, "test_acc_ema": test["ema"].acc}
        for k, v in metrics.items():
            self.log(k, v, self.step)
        for tag in ("raw", "ema"):
            if val[tag].acc > self.selection.val_acc:  # selection reads validation only
                self.selection = Selection(self.step, tag, val[tag].acc, test[tag].acc)
                model = self.model if tag == "raw" else self.ema.model
                checkpoint.save(self.run_dir / "selected.pt", {"step": self.step, "model": tag,
                                                               "state_dict": model.state_dict()})
        self.last_eval = metrics
        if self.on_validation is not None:
            self.on_validation(self.step, {k: v for k, v in metrics.items() if k.startswith("val_")})
        return metrics

    # -- the loop ------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict[str, Any]:
        cfg, steps = self.cfg, self.cfg["steps"]
        bar = tqdm(total=steps, initial=self.step, desc=cfg["method"], file=sys.stderr, mininterval=2.0,
                   dynamic_ncols=True, disable=not progress, leave=True)
        t_window, t_total, images_total = time.perf_counter(), 0.0, 0
        last_flush = t_window
        postfix: dict[str, str] = {}
        extra_reads = self.method.validation_every()
        t_start, step_start = time.perf_counter(), self.step
        with _stop_on_sigint(self), bar:
            while self.step < steps:
                if self._stop_requested:
                    self.save_checkpoint()
                    raise KeyboardInterrupt
                self.train_step()
                at_end = self.step == steps
                if self.step % cfg["log_every"] == 0 or self.step % cfg["ckpt_every"] == 0 or at_end:
                    elapsed = time.perf_counter() - t_window
                    n_done = self._count
                    values = self.flush_logs(elapsed)
                    t_total += elapsed
                    images_total += n_done * (self.n_labeled + self.n_unlabeled)
                    bar.update(self.step - bar.n)
                    postfix.update(progress_fields(values, self.method.status()))
                    bar.set_postfix(postfix, refresh=False)
                    if self.on_progress is not None:
                        rate = (self.step - step_start) / max(time.perf_counter() - t_start, 1e-9)
                        self.on_progress({"step": self.step, "steps": steps, "eta_s": (steps - self.step) / rate,
                                          "val_acc": self.last_eval.get("val_acc")})
                    if time.perf_counter() - last_flush > 10:  # the store's curves stay current
                        self.flush()
                        last_flush = time.perf_counter()
                    t_window = time.perf_counter()
                evaluating = self.method_cls.classifies and (self.step % cfg["eval_every"] == 0 or at_end)
                if evaluating:
                    postfix["val"] = f"{self.evaluate()['val_acc']:.1f}"
                elif extra_reads and self.step % extra_reads == 0 and not at_end:
                    self.validate()
                if evaluating or (extra_reads and self.step % extra_reads == 0):
                    postfix.update(self.method.status())
                    bar.set_postfix(postfix, refresh=False)
                    t_window = time.perf_counter()  # evaluation time is not training throughput
                if self.step % cfg["ckpt_every"] == 0 or at_end:
                    self.save_checkpoint()
                    t_window = time.perf_counter()
        return self.result(images_total / max(t_total, 1e-9))

    def result(self, img_per_s: float) -> dict[str, Any]:
        s, last = self.selection, self.last_eval
        if not self.method_cls.classifies:
            return {"steps": self.step, "img_per_s": img_per_s, "split_hash": self.split.hash,
                    "budget": self.budget()}
        return {"budget": self.budget(), "test_acc": last["test_acc"], "test_acc_ema": last["test_acc_ema"],
                "val_acc": last["val_acc"], "val_acc_ema": last["val_acc_ema"],
                "test_acc_selected": s.test_acc, "selected_step": s.step, "selected_model": s.model,
                "selected_val_acc": s.val_acc, "steps": self.step, "img_per_s": img_per_s,
                "split_hash": self.split.hash}


def progress_fields(values: dict[str, float], status: dict[str, str]) -> dict[str, str]:
    """The progress bar's view of a log window: loss, throughput, pseudo-label health."""
    fields = {"loss": f"{values['loss']:.3f}", "img_s": f"{values['img_per_s']:.0f}"}
    if "pl_rate" in values:
        fields["pl"] = f"{100 * values['pl_rate']:.0f}%"
    if "pl_precision" in values:
        fields["prec"] = f"{100 * values['pl_precision']:.0f}%"
    return {**fields, **status}


@contextlib.contextmanager
def _stop_on_sigint(trainer: Trainer):
    """Ctrl-C asks the loop to stop at the next step boundary, where the state is consistent."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        trainer._stop_requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
