"""The training loop shared by every method: the state, the step, and one screen of loop.

One step: reseed the step's randomness from (seed, step), take the step's indices from the
index streams (also a function of (seed, step)), gather the images on the device ->
`method.train_step` (views are made inside, on the device) -> backward, clip, AdamW step at the
scheduled lr, EMA update. After each step the schedule names what else is due, each on its own
object: reporting (`bench.train.reporting`), evaluation with selection
(`bench.train.evaluation`), a method's validation reading, a checkpoint. Everything the
training emits goes to one `Sink`. The whole state is checkpointed atomically, so `--resume`
continues to the same result as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.config import identity
from bench.data.batch import Batch, Images
from bench.data.dataset import Dataset
from bench.data.randomness import StepRandom
from bench.data.sampler import IndexStream
from bench.data.splits import Split
from bench.data.store import open_store
from bench.distributed import all_sum, average_gradients, barrier, broadcast_module, pick_device, world
from bench.errors import NonFiniteLoss, UsageError
from bench.method.base import Method, TrainData
from bench.method.pseudo import PseudoLabelMode, admission_logs
from bench.method.views import Views
from bench.model.ema import EMA
from bench.model.vit_mae import build_model
from bench.model.weights import digest, transfer
from bench.train import checkpoint
from bench.train.budget import ForwardCounter
from bench.train.evaluation import Evaluator
from bench.train.logwindow import LogWindow
from bench.train.optim import build_optimizer, lr_at, set_lr
from bench.train.reporting import Reporter
from bench.train.schedule import Event, Schedule
from bench.train.sink import Sink
from bench.train.stop import StopRequest


@dataclass
class Trainer:
    cfg: dict[str, Any]
    method_cls: type[Method]
    data: Dataset
    split: Split
    run_dir: Path
    sink: Sink = field(default_factory=Sink)
    store: str | None = None  # where the images live, as the run decided it (bench.run.prepare); None: cfg's
    step: int = 0

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.world = world()
        self.device = dev = pick_device(cfg["device"])
        self.random = StepRandom(cfg["seed"], dev, self.world.rank)  # also seeds the model's initialisation
        # Images come from a store (on the device, or streamed from disk a step ahead); labels are small.
        kind = self.store or cfg["store"]
        self.train_store = open_store(self.data.train_x, dev, kind)
        self.test_store = open_store(self.data.test_x, dev, kind)
        self.train_y = torch.from_numpy(self.data.train_y).to(dev)
        self.test_y = torch.from_numpy(self.data.test_y).to(dev)
        self.test_idx = torch.arange(len(self.test_y), device=dev)
        idx = {k: torch.from_numpy(getattr(self.split, k)).to(dev) for k in ("labeled", "val", "unlabeled")}
        self.use_bf16 = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and dev.type == "cuda")
        self.model = build_model(cfg, self.data.num_classes, with_decoder=self.method_cls.uses_decoder).to(dev)
        self.ema = EMA(self.model, cfg["ema_decay"])
        self.forwards = ForwardCounter(self.model, self.ema.model)
        self.views = Views(cfg["img_size"], self.random, pad_frac=cfg["pad_frac"],
                           randaug_ops=cfg["randaug_ops"], randaug_mag=cfg["randaug_mag"],
                           randaug_prob=cfg["randaug_prob"], cutout_frac=cfg["cutout_frac"], crop=cfg["crop"],
                           crop_scale_min=cfg["crop_scale_min"], jitter=cfg["jitter"],
                           erase_prob=cfg["erase_prob"], eval_crop=cfg["eval_crop"], hflip=self.data.hflip)
        # Methods see the labels of the labeled and validation splits only.
        visible = torch.full_like(self.train_y, -1)
        known = torch.cat([idx["labeled"], idx["val"]])
        visible[known] = self.train_y[known]
        train_data = TrainData(self.train_store, visible, idx["labeled"], idx["val"], idx["unlabeled"])
        # what the method's pseudo-labels train: as admitted, nothing (a control) or the truth (an oracle)
        self.pl_mode = PseudoLabelMode(cfg.get("pl_mode", "on"))
        self.method = self.method_cls(cfg, self.model, self.ema, self.views, self.data.num_classes, train_data,
                                      autocast=self.autocast, pl_mode=self.pl_mode)
        self.optimizer = build_optimizer(self.model, cfg)
        # Global counts: every rank takes an equal, contiguous slice of the step's global batch.
        self.n_labeled = cfg["batch_size"] if self.method_cls.uses_labeled else 0
        self.n_unlabeled = self.method_cls.unlabeled_batch_size(cfg)
        for n in (self.n_labeled, self.n_unlabeled):
            assert n % self.world.size == 0, "runner.check_world rejects batches that do not divide"
        pool = self.split.unlabeled
        if self.method_cls.unlabeled_source == "all":  # label-free methods see every training image
            pool = np.arange(len(self.data.train_x))
        self.labeled = IndexStream(self.split.labeled, self.n_labeled, cfg["seed"], "labeled")
        self.unlabeled = IndexStream(pool, self.n_unlabeled, cfg["seed"], "unlabeled")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg["compile"] and dev.type == "cuda":
            self.model.compile()
        self.window = LogWindow(dev)
        self.forward_images_before = 0  # forward passes of every rank before this process's start
        self.init: dict[str, Any] = {}  # where the weights came from (an earlier stage), for the record
        # the other cadences: evaluation with selection, and reporting; and a stop request
        self.evaluator = Evaluator(self, self.sink, self.run_dir)
        self.reporter = Reporter(self, self.sink)
        self.stop = StopRequest()

    # -- the loop ------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict[str, Any]:
        schedule = self.schedule()
        with self.stop.on_signals(), self.reporter.showing(progress) as report:
            while self.step < self.cfg["steps"]:
                if self.stop.due(self.step, self.cfg["log_every"]):
                    self.save_checkpoint()
                    raise KeyboardInterrupt
                self.train_step()
                for event in schedule.due(self.step):
                    if event == "log":
                        report.log()
                        self.stop.agree()  # a Ctrl-C seen by any rank stops every rank here
                    elif event == "evaluate":
                        report.show({"val": f"{self.evaluator.evaluate()['val_acc']:.1f}", **self.method.status()})
                    elif event == "read":
                        self.evaluator.read()
                        report.show(self.method.status())
                    elif event == "checkpoint":
                        self.save_checkpoint()
                    report.exclude()  # evaluation, checkpoint and logging time is not training throughput
        return self.result(report.images_per_s())

    def schedule(self) -> Schedule:
        """What happens after a step, in order: log (and show progress), evaluate (validation and
        test), a method's extra validation reading (a gate's cadence, where no evaluation falls),
        checkpoint. The log also closes at every checkpoint, so that the curves written before a
        checkpoint end at its step and a resumed run's log windows are the uninterrupted run's."""
        cfg = self.cfg
        reads = self.method.validation_every()
        return Schedule(cfg["steps"], [
            Event("log", (cfg["log_every"], cfg["ckpt_every"]), at_end=True),
            Event("evaluate", (cfg["eval_every"],) if self.method_cls.classifies else (),
                  at_end=self.method_cls.classifies),
            Event("read", (reads,) if reads else (), unless="evaluate"),
            Event("checkpoint", (cfg["ckpt_every"],), at_end=True)])

    # -- one step ------------------------------------------------------------------------------
    def autocast(self):
        if self.use_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def next_batch(self) -> tuple[Batch, torch.Tensor | None]:
        """This rank's slice of the step's images (rows: labeled first, then unlabeled, each
        image keeping its row of the global batch) and the unlabeled images' true labels, which
        stay in the engine."""
        batch, y_u = Batch(), None
        universe = self.n_labeled + self.n_unlabeled
        dev, ranks, rank = self.device, self.world.size, self.world.rank
        host_l, host_u = self.rank_indices(self.step)
        if self.n_labeled:
            n = self.n_labeled // ranks
            idx_l = torch.from_numpy(host_l).to(dev)
            rows = rank * n + torch.arange(n, device=dev)
            batch.l = Images(self.train_store.gather(host_l), rows, self.n_labeled, universe)
            batch.y_l = self.train_y[idx_l]
        if self.n_unlabeled:
            n = self.n_unlabeled // ranks
            idx_u = torch.from_numpy(host_u).to(dev)
            rows = self.n_labeled + rank * n + torch.arange(n, device=dev)
            batch.u = Images(self.train_store.gather(host_u), rows, self.n_unlabeled, universe, start=self.n_labeled)
            batch.idx_u, y_u = idx_u, self.train_y[idx_u]
        self.prefetch(self.step + 1)
        return batch, y_u

    def rank_indices(self, step: int) -> tuple:
        """This rank's slice of step `step`'s labeled and unlabeled indices (None where the
        method draws none): the rows `rank * n` to `(rank + 1) * n` of the global batch."""
        ranks, rank, out = self.world.size, self.world.rank, []
        for stream, total in ((self.labeled, self.n_labeled), (self.unlabeled, self.n_unlabeled)):
            n = total // ranks
            out.append(stream.at(step)[rank * n:(rank + 1) * n] if total else None)
        return tuple(out)

    def prefetch(self, step: int) -> None:
        """The store reads step `step`'s images while this step trains (the streams know them)."""
        if step < self.cfg["steps"]:
            self.train_store.prefetch(*(p for p in self.rank_indices(step) if p is not None))

    def train_step(self) -> None:
        self.model.train()
        self.random.begin(self.step)
        batch, y_u = self.next_batch()
        self.pl_mode.begin_step(y_u)  # an oracle's truth; nothing otherwise
        with self.autocast(), self.forwards.counting():
            loss, logs = self.method.train_step(batch)
        for name, pl in self.method.take_pseudo_labels().items():
            logs.update(admission_logs(pl, y_u, name, partial=self.data.unlabeled_only > 0))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.params)  # one all-reduce for the whole method step, whatever it called
        if self.cfg["clip_grad"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip_grad"])
        set_lr(self.optimizer, lr_at(self.step, self.cfg))
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        self.window.add(loss, logs)

    def forward_images(self) -> float:
        """Encoder forward passes of every rank so far, in image equivalents."""
        mine = torch.tensor([self.forwards.images], dtype=torch.float64,
                            device=self.device if self.world.backend == "nccl" else "cpu")
        return self.forward_images_before + float(all_sum(mine))

    def budget(self) -> dict[str, float]:
        """What this training consumed: optimizer steps, labeled and unlabeled images drawn, and
        encoder forward passes in image equivalents (a masked pass counts its visible share)."""
        return {"steps": self.step, "labeled_images": self.step * self.n_labeled,
                "unlabeled_images": self.step * self.n_unlabeled, "forward_images": round(self.forward_images())}

    def check_finite(self) -> None:
        if not self.window.all_finite():
            raise NonFiniteLoss(f"non-finite loss at or before step {self.step}; lower --lr, set "
                                f"--clip-grad, or check the data")

    # -- state ---------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def state_dict(self) -> dict[str, Any]:
        # No stream or generator state: what a step draws is a function of (seed, step). Nothing
        # depends on the world size either, so a run resumes at any world size.
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "method": self.method.full_state_dict(),
                "forward_images": self.forward_images(), "init": dict(self.init),
                **self.evaluator.state_dict(), "config": identity(self.cfg),
                "health": self.reporter.state_dict(), "log_window": self.window.state_dict(),
                "split_hash": self.split.hash}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != identity(self.cfg) or state["split_hash"] != self.split.hash:
            raise UsageError("the checkpoint was made with a different config or split; "
                             "resume with the original options or start a new run")
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_full_state_dict(state["method"])
        self.forward_images_before, self.init = state["forward_images"], dict(state["init"])
        self.evaluator.load_state_dict(state)
        self.reporter.load_state_dict(state["health"])
        if self.world.is_main:  # the partial window belongs to the rank that logs it
            self.window.load_state_dict(state["log_window"])

    def init_from(self, weights: dict[str, Any], keep_head: bool, ema_from_stage: bool = False) -> None:
        """Start from an earlier stage's weights (`bench.model.weights.transfer`): the encoder always,
        the MAE decoder where both have one, the classifier head when it carries over, else a
        fresh head. The EMA (a teacher, for Semi-ViT) starts as a copy of the loaded model, as
        Semi-ViT's reference builds its teacher, or from the stage's EMA (`ema_from_stage`)."""
        parts = transfer(weights["model"], self.model, keep_head)
        broadcast_module(self.model)  # a re-drawn head is rank 0's on every rank
        self.ema.copy_from(self.model)
        if ema_from_stage:
            transfer(weights["ema"], self.ema.model, keep_head)
        model, ema = self.model.state_dict(), self.ema.model.state_dict()
        self.init = {"head": "stage's" if keep_head else "re-drawn (std 2e-5)", "loaded": ["encoder", *parts],
                     "ema": "stage's EMA" if ema_from_stage else "a copy of the loaded model",
                     "encoder_sha256": digest(model), "head_sha256": digest(model, "head"),
                     "ema_encoder_sha256": digest(ema), "ema_head_sha256": digest(ema, "head")}
        if "decoder" in parts:
            self.init["decoder_sha256"] = digest(model, "decoder")

    def save_checkpoint(self) -> None:
        """Every rank takes part (the state's counts are reduced); rank 0 alone writes."""
        self.check_finite()
        state = self.state_dict()
        if self.world.is_main:
            self.sink.flush()  # metrics first: a kill between the two leaves no gap after resume
            checkpoint.save(self.ckpt_path, state)
        barrier()  # no rank runs ahead of a checkpoint another rank may resume from

    def result(self, img_per_s: float) -> dict[str, Any]:
        s, last = self.evaluator.selection, self.evaluator.last
        if not self.method_cls.classifies:
            return {"steps": self.step, "img_per_s": img_per_s, "split_hash": self.split.hash,
                    "budget": self.budget()}
        return {"budget": self.budget(), "test_acc": last["test_acc"], "test_acc_ema": last["test_acc_ema"],
                "val_acc": last["val_acc"], "val_acc_ema": last["val_acc_ema"],
                "test_acc_selected": s.test_acc, "selected_step": s.step, "selected_model": s.model,
                "selected_val_acc": s.val_acc, "steps": self.step, "img_per_s": img_per_s,
                "split_hash": self.split.hash}
