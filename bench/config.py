"""The configuration of a run: defaults < preset < study < CLI, validated, flat.

A resolved config is a flat dict: every core option below plus the method's own options, plus
`method` and `preset`. It is saved with every run (Sacred's config.json) and a resumed run must
match it exactly on every key that changes the result (`IDENTITY_EXCLUDED` lists the others).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from bench.data.dataset import DATASETS
from bench.errors import UsageError
from bench.options import (DATA, MODEL, OPTIM, PSEUDO, RUN, SPLIT, START, VIEWS, Option, non_negative, positive,
                           unit_closed, unit_open, unit_open_closed)

PRESET_DIR = Path(__file__).parent / "presets"


def _opt(default, help, group, **kw) -> Option:
    return Option(default, help, group=group, **kw)


CORE_OPTIONS: dict[str, Option] = {
    # data and split
    "dataset": _opt("synthetic", "dataset name", DATA, choices=DATASETS),
    "data": _opt(None, "path to the dataset archive or folder (offline CIFAR: the official "
                 "cifar-10-python.tar.gz / cifar-100-python.tar.gz or an image-folder tarball; STL-10: "
                 "stl10_binary.tar.gz; SVHN: the folder of its .mat files); unset: CIFAR, STL-10 and SVHN are "
                 "downloaded, synthetic generated", DATA),
    "unlabeled_data": _opt(None, "a folder or tarball of unlabeled-only images (any size, resized and centre-"
                           "cropped to the dataset's side) joining the unlabeled pool, never a label split; MAE "
                           "pretraining sees them too", DATA),
    "cache_dir": _opt(None, "cache for downloads, decoded arrays and split manifests; unset: "
                      "$SSVIT_CACHE, else ~/.cache/ssvit-bench", DATA),
    "image_side": _opt(None, "cache every image at this side (shorter side resized, centre crop) in an on-disk "
                       "cache a store can stream; unset: imagenet 256, others their own size", DATA,
                       type=int, **positive()),
    "store": _opt("auto", "where the images live: resident (on the device), streamed (read from the on-disk "
                  "cache a step ahead) or auto (resident if it fits a quarter of free memory)", DATA,
                  choices=("auto", "resident", "streamed")),
    "synthetic_classes": _opt(10, "synthetic: number of classes", DATA, **positive()),
    "synthetic_size": _opt(32, "synthetic: image side in pixels", DATA, **positive()),
    "synthetic_train_per_class": _opt(100, "synthetic: training images per class", DATA, **positive()),
    "synthetic_test_per_class": _opt(20, "synthetic: test images per class", DATA, **positive()),
    "label_fraction": _opt(0.1, "labeled budget as a fraction of each class (0 < F <= 1)", SPLIT,
                           **unit_open_closed()),
    "labels_per_class": _opt(None, "labeled budget per class; set, it overrides --label-fraction", SPLIT,
                             type=int, **positive()),
    "val_fraction": _opt(0.1, "share of the labeled budget held out for validation (>= 1 per class)", SPLIT, **unit_open()),
    "unlabeled_pool": _opt("all", "unlabeled pool: all training images but validation, or only "
                           "the non-labeled ones", SPLIT, choices=("all", "rest")),
    "split_file": _opt(None, "the labeled images as a standard subset file: SimCLR's 1percent.txt format (file "
                       "names) or Semi-ViT's index CSV (positions in ImageFolder order); overrides the label "
                       "budget", SPLIT),
    "split_format": _opt("auto", "format of --split-file (auto: detected from its first line)", SPLIT,
                         choices=("auto", "simclr", "semivit")),
    "val_from": _opt("labeled", "where validation comes from: carved out of the labeled budget, or a held-out "
                     "slice of the other training images whose labels are read for validation only", SPLIT,
                     choices=("labeled", "unlabeled")),
    "val_per_class": _opt(None, "validation images per class; unset: --val-fraction of the class's labeled budget "
                          "(at 25 labels per class, 2 or 3: take it from the unlabeled images at a size that "
                          "can decide something, e.g. --val-from unlabeled --val-per-class 100)", SPLIT, type=int,
                          **positive()),
    "seed": _opt(0, "seed of the split, the initialisation and every augmentation", SPLIT,
                 **non_negative()),
    # model
    "encoder": _opt("vit_small_patch16_224", "timm ViT name", MODEL),
    # where the weights start
    "start": _opt("scratch", "where the encoder starts: scratch (random) or mae (the cached MAE pretraining "
                  "stage, one per seed, shared by every method; --pretrain-* set it)", START,
                  choices=("scratch", "mae")),
    "init_from": _opt(None, "start from this weight file instead: MAE's official .pth, a timm ViT weight file, or "
                      "the suite's own stage (<results>/stages/KEY) or run (<results>/runs/ID) checkpoint; the "
                      "MAE stage is then not trained", START),
    "img_size": _opt(32, "model input resolution (images are resized on the device)", MODEL,
                     **positive()),
    "patch_size": _opt(4, "patch size", MODEL, **positive()),
    "embed_dim": _opt(None, "encoder width; unset: the --encoder's", MODEL, type=int, **positive()),
    "depth": _opt(None, "encoder blocks; unset: the --encoder's", MODEL, type=int, **positive()),
    "num_heads": _opt(None, "encoder attention heads; unset: the --encoder's", MODEL, type=int, **positive()),
    "mlp_ratio": _opt(None, "encoder MLP width / embedding width (small-data ViTs use 2); unset: the "
                      "--encoder's", MODEL, type=float, **positive()),
    "drop_path": _opt(0.1, "stochastic depth rate", MODEL, **unit_open()),
    "global_pool": _opt("avg", "classifier input: cls token or mean of patch tokens", MODEL,
                        choices=("token", "avg")),
    "pos_embed": _opt("learn", "positional embedding: learned or fixed 2-D sin-cos", MODEL,
                      choices=("learn", "sincos")),
    "decoder_dim": _opt(256, "MAE decoder width", MODEL, **positive()),
    "decoder_depth": _opt(4, "MAE decoder blocks", MODEL, **positive()),
    "decoder_heads": _opt(8, "MAE decoder heads", MODEL, **positive()),
    "norm_pix_loss": _opt(True, "MAE target: per-patch normalised pixels (else raw)", MODEL),
    # optimisation
    "steps": _opt(5000, "training length in optimizer steps", OPTIM, **positive()),
    "batch_size": _opt(64, "labeled images per step", OPTIM, **positive()),
    "lr": _opt(1e-3, "peak learning rate (AdamW)", OPTIM, **positive()),
    "min_lr": _opt(1e-6, "final learning rate of the cosine schedule", OPTIM, **non_negative()),
    "schedule": _opt("cosine", "learning-rate schedule after warm-up", OPTIM,
                     choices=("cosine", "constant")),
    "warmup_steps": _opt(250, "linear warm-up steps (capped at --steps)", OPTIM, **non_negative()),
    "weight_decay": _opt(0.05, "AdamW weight decay (never on norms, biases, embeddings)", OPTIM,
                         **non_negative()),
    "beta1": _opt(0.9, "AdamW beta1", OPTIM, **unit_open()),
    "beta2": _opt(0.999, "AdamW beta2", OPTIM, **unit_open()),
    "layer_decay": _opt(1.0, "layer-wise lr decay (1 = off)", OPTIM, **unit_open_closed()),
    "clip_grad": _opt(0.0, "clip the gradient norm to this value (0 = off)", OPTIM, **non_negative()),
    "label_smoothing": _opt(0.0, "label smoothing of the supervised loss", OPTIM, **unit_open()),
    "ema_decay": _opt(0.999, "decay of the EMA model (evaluated beside the raw model)", OPTIM,
                      **unit_open()),
    # what a semi-supervised method's pseudo-labels train
    "pl_mode": _opt("on", "what the pseudo-labels train: on; off (the method's control: the same run and random "
                    "numbers, its pseudo-label term switched off); oracle (a diagnostic: the true labels under "
                    "the method's own admission mask; never a default, refused by bench tune)", PSEUDO,
                    choices=("on", "off", "oracle")),
    # views of the labeled batch and the shared augmentation pipeline
    "labeled_view": _opt("weak", "augmentation of labeled images", VIEWS,
                         choices=("weak", "strong", "mae", "eval")),
    "pad_frac": _opt(0.125, "weak view: max translation as a fraction of the image side", VIEWS,
                     **unit_closed()),
    "randaug_ops": _opt(2, "strong view: RandAugment ops per image", VIEWS, **non_negative()),
    "randaug_prob": _opt(0.5, "strong view: probability that each drawn RandAugment op is applied "
                         "(FixMatch's RandAugmentMC: 0.5)", VIEWS, **unit_closed()),
    "randaug_mag": _opt(10.0, "strong view: RandAugment magnitude, 0..10 (each op draws its "
                        "strength uniformly up to this share of its maximum)", VIEWS,
                        check=lambda v: 0 <= v <= 10, check_msg="in [0, 10]"),
    "cutout_frac": _opt(0.5, "strong view: cutout square side as a fraction of the image", VIEWS,
                        **unit_closed()),
    "crop": _opt("translate", "crop of the weak, strong and labeled views: translate (reflect-pad + crop, "
                 "CIFAR's) or rrc (random resized crop, ImageNet's)", VIEWS, choices=("translate", "rrc")),
    "crop_scale_min": _opt(0.08, "rrc: smallest area share of a crop", VIEWS, **unit_open_closed()),
    "jitter": _opt(0.0, "weak view: colour jitter (brightness, contrast, saturation in [1-j, 1+j]; Semi-ViT 0.4)", VIEWS, **unit_closed()),
    "erase_prob": _opt(0.0, "strong view: random-erasing probability (Semi-ViT, MAE fine-tuning 0.25)", VIEWS,
                       **unit_closed()),
    "eval_crop": _opt(1.0, "evaluation: centre-crop share after resizing (0.875: resize 256, crop 224; 1: resize "
                      "the whole image)", VIEWS, **unit_open_closed()),
    "mixup_alpha": _opt(0.0, "mixup alpha on labeled batches (0 = off)", VIEWS, **non_negative()),
    "cutmix_alpha": _opt(0.0, "cutmix alpha on labeled batches (0 = off)", VIEWS, **non_negative()),
    # run mechanics
    "eval_every": _opt(500, "evaluate validation and test every N steps", RUN, **positive()),
    "ckpt_every": _opt(1000, "checkpoint every N steps (and at the end)", RUN, **positive()),
    "log_every": _opt(50, "log loss terms and throughput every N steps", RUN, **positive()),
    "eval_batch_size": _opt(512, "batch size for evaluation", RUN, **positive()),
    "amp": _opt("auto", "precision: auto = bf16 autocast on CUDA, fp32 on CPU", RUN,
                choices=("auto", "bf16", "fp32")),
    "compile": _opt(False, "torch.compile the model", RUN),
    "device": _opt("auto", "auto, cpu, cuda or cuda:N", RUN),
    "results_dir": _opt("results", "output root: runs/ (one Sacred run each), stages/ (cached earlier "
                        "stages; a missing one is copied from published/stages/ where kept there), "
                        "studies/, reports/, tuned/ and speed/", RUN),
    "mongo": _opt(None, "also record runs in MongoDB at this URL (unset: the file store only)", RUN),
    "progress": _opt(True, "show a progress bar", RUN),
    "dist_timeout": _opt(300.0, "seconds a rank waits on the others (rendezvous, a collective) before the "
                         "run stops as FAILED", RUN, type=float, **positive()),
}

# Keys that do not change what a run computes: a resume may differ on these. (`world_size`,
# `rank_batch` and `store_used` are runtime facts kept in a run's info; records made before
# they moved there hold them in their config.)
IDENTITY_EXCLUDED = {"results_dir", "mongo", "progress", "device", "cache_dir", "data", "unlabeled_data",
                     "compile", "eval_batch_size", "dist_timeout", "world_size", "rank_batch", "store",
                     "store_used"}


def load_preset(preset: str | None) -> tuple[str | None, dict[str, Any]]:
    """Return (preset name, its mapping). `preset` is a shipped name or a YAML file path."""
    if preset is None:
        return None, {}
    path = shipped_or_file(PRESET_DIR, preset, "preset")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read preset {path}: {str(e).splitlines()[0]}; fix the YAML") from None
    if not isinstance(data, dict):
        raise UsageError(f"preset {path} must be a mapping of option: value; fix the YAML")
    name = preset if path.parent == PRESET_DIR else str(path)
    return name, data


def shipped_or_file(directory: Path, name: str, kind: str) -> Path:
    """`<directory>/<name>.yaml` if shipped, else `name` as a path to a YAML file."""
    path = directory / f"{name}.yaml"
    if path.is_file():
        return path
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        names = sorted(p.stem for p in directory.glob("*.yaml"))
        raise UsageError(f"unknown {kind} '{name}'; use one of {', '.join(names)} or a path to a {kind} .yaml file")
    return path


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def method_layer(mapping: dict[str, Any], method: str, source: str) -> dict[str, Any]:
    """Flatten a preset/study mapping for one method: top-level keys, then `methods: {name: {...}}`."""
    flat = {k: v for k, v in mapping.items() if k != "methods"}
    per_method = mapping.get("methods") or {}
    if not isinstance(per_method, dict):
        raise UsageError(f"{source}: 'methods' must map method names to options; fix the YAML")
    flat.update(per_method.get(method) or {})
    return flat


def defaults(method_cls) -> dict[str, Any]:
    """The bottom layer of a method's config: core defaults < the method's recipe (its paper's
    supervised branch, e.g. no label smoothing under a 0.95 threshold) < its own options."""
    return {**{k: opt.default for k, opt in all_options(method_cls).items()}, **method_cls.recipe}


def resolve(method_cls, preset: str | None = None, study: dict | None = None,
            cli: dict | None = None, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge defaults < preset < study < CLI for `method_cls`, validating every value. When
    `sources` is given, it receives the layer each value came from."""
    options = all_options(method_cls)
    preset_name, preset_map = load_preset(preset)
    cfg = defaults(method_cls)
    where = {k: (f"{method_cls.name}'s recipe" if k in method_cls.recipe else "default") for k in cfg}
    layers = [(f"preset {preset_name}", method_layer(preset_map, method_cls.name, f"preset {preset_name}")),
              ("study", method_layer(study or {}, method_cls.name, "study")),
              ("command line", method_layer(cli or {}, method_cls.name, "command line"))]
    for source, layer in layers:
        for key, value in layer.items():
            if key not in options:
                raise UsageError(f"{source}: unknown option '{key}' for method {method_cls.name}; "
                                 f"see `bench run {method_cls.name} --help`")
            cfg[key] = options[key].convert(key, value)
            where[key] = source
    for key, own in method_cls.recipe.items():  # a layer above the recipe that changes it is flagged
        if cfg[key] != own:
            where[key] += f" (overrides {method_cls.name}'s recipe: {own})"
    cfg["method"] = method_cls.name
    cfg["preset"] = preset_name
    if method_cls.plugin is not None:  # a user's method: its source is part of what the run computes
        cfg["plugin_sha256"] = method_cls.plugin["sha256"]
    if cfg.get("split_file") and where["label_fraction"] == "default":
        cfg["label_fraction"] = None  # the file sets the budget: its share, filled once the data is read
    _check_consistency(cfg)
    if sources is not None:
        sources.update(where)
    return cfg


def render(cfg: dict[str, Any], sources: dict[str, str]) -> str:
    """A resolved config as YAML, each value commented with the layer it came from; usable as a
    preset file (`--preset FILE`)."""
    lines = [f"# bench run {cfg['method']}: resolved config (defaults < preset < study < command line)",
             f"# preset: {cfg['preset']}"]
    for key, value in cfg.items():
        if key in ("method", "preset"):
            continue
        lines.append(f"{key}: {json.dumps(value)}  # {sources.get(key, 'default')}")
    return "\n".join(lines) + "\n"


def all_options(method_cls) -> dict[str, Option]:
    """Every option of a method: the core's, those of the stages it may train (the MAE stage, its
    own stages), and its own."""
    clash = set(CORE_OPTIONS) & set(method_cls.options)
    assert not clash, f"method {method_cls.name} redeclares core options {clash}"
    stray = set(method_cls.recipe) - set(CORE_OPTIONS)
    assert not stray, f"method {method_cls.name}'s recipe sets {stray}, which are not core options"
    return {**CORE_OPTIONS, **stage_options_of(method_cls), **method_cls.options}


def stage_options_of(method_cls, planned: list | None = None) -> dict[str, Option]:
    """The options that set the stages of `method_cls` (of the `planned` stages only, if given)."""
    from bench.method.base import get_method
    from bench.method.stage import PRETRAIN, stage_options
    # every method takes the MAE stage's options (a preset sets them once for all); a run trains
    # the stage only where bench.method.stage.stages_of says so
    stages = [PRETRAIN, *method_cls.stages]
    if planned is not None:
        stages = [s for s in stages if s in planned]
    out: dict[str, Option] = {}
    for stage in stages:
        out.update(stage_options(stage, CORE_OPTIONS, get_method(stage.method).options))
    return out


def _check_consistency(cfg: dict[str, Any]) -> None:
    if cfg["img_size"] % cfg["patch_size"]:
        raise UsageError(f"--img-size {cfg['img_size']} is not divisible by --patch-size "
                         f"{cfg['patch_size']}; pick sizes that divide")
    if cfg["dataset"] == "synthetic" and cfg["data"]:
        raise UsageError(f"--data {cfg['data']} is ignored by --dataset synthetic; pick --dataset cifar10, "
                         f"cifar100 or imagefolder, or drop --data")
    if cfg["dataset"] == "imagenet" and not cfg["data"]:
        raise UsageError("--dataset imagenet needs --data PATH to the ILSVRC-2012 folder (train/<wnid>/*.JPEG, "
                         "val/<wnid>/*.JPEG); nothing is downloaded")
    if cfg["start"] == "mae" and cfg["method"] == "mae_pretrain":
        raise UsageError("--start mae: mae_pretrain is the MAE stage itself; drop --start")
    if cfg["dataset"] == "imagefolder" and not cfg["data"]:
        raise UsageError("--dataset imagefolder needs --data PATH (a train/<class>, test/<class> "
                         "folder or a .tar/.tar.gz of one)")


def identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a config that determines the result (compared on resume and with run
    records): every option but the mechanics (IDENTITY_EXCLUDED) and the options of stages the
    run does not train (pretraining knobs of a run from scratch). An option a config lacks (a
    record made before the option existed) reads as its default, which keeps the behaviour it
    was added with."""
    from bench.method.base import REGISTRY, method_names
    method_names()  # the registry, filled
    method_cls = REGISTRY.get(cfg.get("method"))
    if method_cls is None:
        return {k: v for k, v in cfg.items() if k not in IDENTITY_EXCLUDED}
    from bench.method.stage import stages_of
    full = {**defaults(method_cls), **cfg}
    unused = set(stage_options_of(method_cls)) - set(stage_options_of(method_cls, stages_of(full, method_cls)))
    if full.get("split_file"):
        unused.add("label_fraction")  # the file's share, derived from it
    return {k: v for k, v in full.items() if k not in IDENTITY_EXCLUDED and k not in unused}


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys on which two configs' identities differ, sorted."""
    a, b = identity(a), identity(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
