"""Earlier stages: what MAE pretraining and fine-tuning take from the run, and what keys them."""
import pytest

from bench.config import resolve
from bench.method import get_method
from bench.model import build_model
from bench.optim import param_groups
from bench.stages import stage_config, stage_key


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
    # so every parameter, the patch embedding included, pretrains at the full learning rate
    model = build_model({**scfg, "embed_dim": 32, "depth": 2, "num_heads": 2}, 10, with_decoder=True)
    assert {g["lr_scale"] for g in param_groups(model, scfg["weight_decay"], scfg["layer_decay"])} == {1.0}


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
