"""Earlier stages: what MAE pretraining and fine-tuning take from the run, what keys them, and
what they hand on; the optimizer's parameter groups and schedule."""
import math
from pathlib import Path

import pytest
import torch

from bench.config import resolve
from bench.method import get_method
from bench.model import build_model
from bench.optim import lr_at, param_groups
from bench.stages import digest, stage_config, stage_key
from helpers import bench, load_json, run_dirs, smoke_trainer


def stage_cfgs(method: str, preset: str = "fast", **cli) -> dict:
    cls = get_method(method)
    cfg = resolve(cls, preset=preset, cli=cli)
    return {s.name: stage_config(cfg, s, get_method(s.method)) for s in cls.stages}


def pretrain_key(method: str, preset: str = "fast", **cli) -> str:
    scfg = stage_cfgs(method, preset, **cli)["pretrain"]
    return stage_key(scfg, get_method("mae_pretrain"), None, "data", "split")


def test_mae_pretraining_never_inherits_the_fine_tuning_recipe():
    run = resolve(get_method("mae_finetune"), preset="fast")
    assert run["layer_decay"] == 0.65 and run["label_smoothing"] == 0.1 and run["mixup_alpha"] > 0
    scfg = stage_cfgs("mae_finetune")["pretrain"]
    assert scfg["layer_decay"] == 1.0
    assert scfg["label_smoothing"] == 0.0 and scfg["mixup_alpha"] == scfg["cutmix_alpha"] == 0.0
    assert scfg["drop_path"] == 0.0 and scfg["beta2"] == 0.95
    assert (scfg["steps"], scfg["lr"], scfg["batch_size"]) == (run["pretrain_steps"], run["pretrain_lr"],
                                                               run["pretrain_batch_size"])
    # architecture and data come from the run
    for key in ("encoder", "embed_dim", "patch_size", "img_size", "global_pool", "pos_embed", "decoder_dim",
                "dataset", "seed"):
        assert scfg[key] == run[key], key
    # so the patch embedding pretrains at the full scheduled lr, where fine-tuning gives it 0.65 ** 13
    from bench.data import make_synthetic
    from bench.engine import Trainer
    from bench.splits import make_split
    data = make_synthetic(classes=4, size=32, train_per_class=20, test_per_class=2)
    split = make_split(data.train_y, 4, label_fraction=0.5)
    small = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8, "decoder_dim": 32,
             "batch_size": 8, "device": "cpu", "compile": False}
    for cfg, scale in (({**scfg, **small}, 1.0), ({**run, **small}, 0.65 ** 3)):
        t = Trainer(cfg, get_method(cfg["method"]), data, split, Path("/nonexistent"))
        t.train_step()
        lr = {id(p): g["lr"] for g in t.optimizer.param_groups for p in g["params"]}
        assert lr[id(t.model.vit.patch_embed.proj.weight)] == pytest.approx(lr_at(0, cfg) * scale), cfg["method"]


def test_semi_vit_fine_tuning_stage_uses_the_runs_labeled_recipe():
    run = resolve(get_method("semi_vit"), preset="fast")
    scfg = stage_cfgs("semi_vit")["finetune"]
    for key in ("label_smoothing", "mixup_alpha", "cutmix_alpha", "labeled_view", "layer_decay"):
        assert scfg[key] == run[key], key
    assert (scfg["steps"], scfg["lr"]) == (run["finetune_steps"], run["finetune_lr"])


def test_methods_with_the_same_pretraining_share_one_encoder():
    assert pretrain_key("mae_finetune") == pretrain_key("semi_vit")


@pytest.mark.parametrize("knob", [{"label_smoothing": 0.2}, {"mixup_alpha": 0.0}, {"labeled_view": "eval"},
                                  {"ema_decay": 0.99}, {"layer_decay": 0.5}, {"lr": 0.01}, {"steps": 77},
                                  {"weight_decay": 0.3}, {"eval_every": 7}])
def test_stage_key_ignores_what_pretraining_never_reads(knob):
    assert pretrain_key("mae_finetune", **knob) == pretrain_key("mae_finetune")


@pytest.mark.parametrize("knob", [{"pretrain_mask_ratio": 0.6}, {"pretrain_lr": 0.001}, {"depth": 3},
                                  {"decoder_depth": 2}, {"seed": 1}, {"norm_pix_loss": False}])
def test_stage_key_follows_what_pretraining_reads(knob):
    assert pretrain_key("mae_finetune", **knob) != pretrain_key("mae_finetune")


# -- hand-offs between stages ------------------------------------------------------------------
def stage_files(run_dir, name):
    from bench import checkpoint
    stage_dir = Path(load_json(run_dir / "info.json")["stages"][name]["dir"])
    return checkpoint.load(stage_dir / "final.pt"), load_json(stage_dir / "stage.json")


@pytest.mark.parametrize("method", ["mae_finetune", "semi_vit"])
def test_each_stage_starts_from_the_weights_the_stage_before_it_handed_on(tmp_path, method):
    """The encoder always arrives (SSMAE's reference silently fine-tuned from scratch, flaw F8);
    a head after MAE pretraining is re-drawn; Semi-ViT's stage 3 keeps stage 2's head and takes
    stage 2's EMA as its teacher."""
    results = tmp_path / "r"
    out = bench(["run", method, "--preset", "smoke", "--no-progress", "--results-dir", str(results)],
                tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = run_dirs(results)
    init = load_json(run / "info.json")["init"]
    pretrained, _ = stage_files(run, "pretrain")
    if method == "mae_finetune":
        assert init["encoder_sha256"] == digest(pretrained["model"])
        assert init["head_sha256"] != digest(pretrained["model"], "head") and init["head"].startswith("re-drawn")
        assert init["ema_encoder_sha256"] == init["encoder_sha256"] != digest(pretrained["ema"])
        return
    finetuned, finetune_record = stage_files(run, "finetune")
    assert finetune_record["init"]["encoder_sha256"] == digest(pretrained["model"])   # stage 1 -> 2
    assert finetune_record["init"]["head"].startswith("re-drawn")
    assert init["encoder_sha256"] == digest(finetuned["model"])                       # stage 2 -> 3
    assert init["head_sha256"] == digest(finetuned["model"], "head")
    assert init["ema_encoder_sha256"] == digest(finetuned["ema"]) != digest(finetuned["model"])
    assert init["ema_head_sha256"] == digest(finetuned["ema"], "head")


def test_a_head_that_does_not_carry_over_is_redrawn_small(tiny_data, tmp_path):
    t = smoke_trainer("mae_finetune", tiny_data, tmp_path)
    weights = {"model": {k: v + 1.0 for k, v in t.model.state_dict().items()}, "ema": t.ema.model.state_dict()}
    t.init_from(weights, keep_head=False)
    head = t.model.vit.head
    assert 1e-5 < float(head.weight.detach().std()) < 4e-5 and not head.bias.any()  # N(0, 2e-5), as MAE draws it
    assert torch.equal(t.model.vit.blocks[0].mlp.fc1.weight, weights["model"]["vit.blocks.0.mlp.fc1.weight"])
    assert torch.equal(t.ema.model.vit.blocks[0].mlp.fc1.weight, t.model.vit.blocks[0].mlp.fc1.weight)


# -- optimisation: parameter groups and the schedule --------------------------------------------
def test_parameter_groups_match_timms_layer_decay_groups():
    from timm.optim import param_groups_layer_decay
    cfg = resolve(get_method("mae_finetune"), preset="smoke", cli={"depth": 3})
    model = build_model(cfg, 10, with_decoder=True)
    ours = {}
    for g in param_groups(model, 0.05, 0.65):
        for p in g["params"]:
            ours[id(p)] = (g["lr_scale"], g["weight_decay"])
    theirs = {}
    for g in param_groups_layer_decay(model.vit, 0.05, model.vit.no_weight_decay(), layer_decay=0.65):
        for p in g["params"]:
            theirs[id(p)] = (g["lr_scale"], g["weight_decay"])
    assert theirs and set(theirs) <= set(ours)
    for name, p in model.vit.named_parameters():
        assert ours[id(p)] == pytest.approx(theirs[id(p)]), name
    assert ours[id(model.vit.patch_embed.proj.weight)] == pytest.approx((0.65 ** 4, 0.05))  # depth 3 + 1


def lr_reference(step, base, total, warmup, min_lr):
    """Linear warm-up to `base` over `warmup` steps (the first step at base / warmup), then a
    half-cycle cosine to `min_lr` at the last step (MAE's util/lr_sched.py, per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_the_optimizer_runs_the_scheduled_lr_scaled_per_group(tiny_data, tmp_path):
    t = smoke_trainer("mae_finetune", tiny_data, tmp_path, steps=50, warmup_steps=10, lr=0.002, min_lr=1e-5,
                      layer_decay=0.5)
    depth = t.model.num_layers
    patch = t.model.vit.patch_embed.proj.weight
    seen = {}
    for step in range(50):
        t.train_step()
        if step in (0, 5, 9, 10, 30, 49):
            seen[step] = {id(p): g["lr"] for g in t.optimizer.param_groups for p in g["params"]}
    for step, lrs in seen.items():
        expected = lr_reference(step, 0.002, 50, 10, 1e-5)
        assert lrs[id(t.model.vit.head.weight)] == pytest.approx(expected), step
        assert lrs[id(patch)] == pytest.approx(expected * 0.5 ** (depth + 1)), step
    assert lr_at(49, t.cfg) == pytest.approx(1e-5 + (0.002 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
