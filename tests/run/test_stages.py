"""Earlier stages: what MAE pretraining and fine-tuning take from the run, what keys them, and
what they hand on; the optimizer's parameter groups and schedule."""
import math
from pathlib import Path

import pytest
import torch

from bench.config import resolve
from bench.method.base import get_method
from bench.model.vit_mae import build_model
from bench.train.optim import lr_at, param_groups
from bench.model.weights import digest
from bench.run.stages import plan, stage_key
from helpers import SHARED_START_ARGS as SHORT_ARGS, bench, load_json, run_dirs, smoke_trainer



def stage_cfgs(method: str, preset: str = "fast", **cli) -> dict:
    cls = get_method(method)
    cfg = resolve(cls, preset=preset, cli=cli)
    return {p.stage.name: p.cfg for p in plan(cfg, cls)}


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
    from bench.data.sources import make_synthetic
    from bench.train.trainer import Trainer
    from bench.data.splits import make_split
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
    # its EMA is its own: stage 3's decay does not reach stage 2
    assert stage_cfgs("semi_vit", ema_decay=0.9)["finetune"]["ema_decay"] == 0.999
    assert stage_cfgs("semi_vit", finetune_ema_decay=0.99)["finetune"]["ema_decay"] == 0.99


def test_a_stage_option_is_generated_from_the_core_declaration_it_sets():
    from bench.config import CORE_OPTIONS, all_options
    from bench.errors import UsageError
    options = all_options(get_method("semi_vit"))
    for name in ("finetune_lr", "finetune_ema_decay", "pretrain_weight_decay", "pretrain_mask_ratio"):
        assert name in options and options[name].kind is float, name
    assert CORE_OPTIONS["ema_decay"].help in options["finetune_ema_decay"].help
    with pytest.raises(UsageError, match="--finetune-ema-decay"):  # the core's range check, under the stage's flag
        resolve(get_method("semi_vit"), cli={"finetune_ema_decay": 1.5})
    with pytest.raises(UsageError, match="--pretrain-steps"):
        resolve(get_method("fixmatch"), cli={"pretrain_steps": 0})


def test_methods_with_the_same_pretraining_share_one_encoder():
    assert pretrain_key("mae_finetune") == pretrain_key("semi_vit")
    for method in ("fixmatch", "flexmatch", "freematch", "semi_mae", "ssmae", "supervised"):
        assert "pretrain" not in stage_cfgs(method)                          # from scratch by default
        assert pretrain_key(method, start="mae") == pretrain_key("mae_finetune"), method


@pytest.mark.parametrize("preset", ["cpu", "smoke"])
def test_semi_vits_stage_two_is_mae_finetunes_run_at_the_preset(preset):
    """The same cached stage: semi_vit against mae_finetune compares stage 3 with the model it starts from."""
    def keys(method):
        cls, previous, out = get_method(method), None, []
        for p in plan(resolve(cls, preset=preset), cls):
            previous = stage_key(p.cfg, p.method_cls, previous, "data", "split")
            out.append(previous)
        return out
    assert keys("semi_vit") == keys("mae_finetune") and len(keys("semi_vit")) == 2


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
    from bench.train import checkpoint
    stage_dir = Path(load_json(run_dir / "info.json")["stages"][name]["dir"])
    return checkpoint.load(stage_dir / "final.pt"), load_json(stage_dir / "stage.json")


def test_each_stage_starts_from_the_weights_the_stage_before_it_handed_on(shared_start):
    """The encoder always arrives (SSMAE's reference silently fine-tuned from scratch, flaw F8);
    a head after MAE pretraining is re-drawn; Semi-ViT's stage 3 keeps stage 2's head, and its
    EMA teacher starts as a copy of the fine-tuned student (main_semi.py), not as stage 2's EMA."""
    runs = shared_start["runs"]
    pretrained, _ = stage_files(runs["mae_finetune"], "pretrain")
    init = load_json(runs["mae_finetune"] / "info.json")["init"]   # the fine-tune stage's, the run's own
    assert init["encoder_sha256"] == digest(pretrained["model"])
    assert init["head_sha256"] != digest(pretrained["model"], "head") and init["head"].startswith("re-drawn")
    assert init["ema_encoder_sha256"] == init["encoder_sha256"] != digest(pretrained["ema"])
    semi = runs["semi_vit"]
    finetuned, finetune_record = stage_files(semi, "finetune")
    assert finetune_record["init"]["encoder_sha256"] == digest(pretrained["model"])   # stage 1 -> 2
    assert finetune_record["init"]["head"].startswith("re-drawn")
    init = load_json(semi / "info.json")["init"]
    assert init["encoder_sha256"] == digest(finetuned["model"])                       # stage 2 -> 3
    assert init["head_sha256"] == digest(finetuned["model"], "head")
    # the teacher at stage-3 step 0 is the loaded student, weight for weight
    assert init["ema_encoder_sha256"] == init["encoder_sha256"] != digest(finetuned["ema"])
    assert init["ema_head_sha256"] == init["head_sha256"]
    # --teacher-start stage_ema: the ablation keeps stage 2's EMA
    ablation = load_json(runs["semi_vit_stage_ema"] / "info.json")["init"]
    assert ablation["ema_encoder_sha256"] == digest(finetuned["ema"]) != digest(finetuned["model"])
    assert ablation["ema_head_sha256"] == digest(finetuned["ema"], "head")


def test_semi_vit_starts_from_the_very_fine_tune_mae_finetune_reports(shared_start):
    """One cached stage, in either order: the second method hits the cache instead of retraining."""
    runs = shared_start["runs"]
    fine, semi = (load_json(runs[m] / "run.json")["result"] for m in ("mae_finetune", "semi_vit"))
    info = load_json(runs["semi_vit"] / "info.json")["stages"]
    assert not fine["reused"] and info["finetune"]["reused"] and info["finetune"]["key"] == fine["stage_key"]
    assert info["pretrain"]["reused"] and semi["stages"][1]["minutes"] == pytest.approx(fine["minutes"])
    # the other order: semi_vit trains stage 2, and mae_finetune's run is that stage, with its curves
    first, then = runs["semi_vit_first"], runs["mae_finetune_second"]
    result = load_json(then / "run.json")["result"]
    assert result["reused"] and result["stage_key"] == load_json(first / "info.json")["stages"]["finetune"]["key"]
    trained = load_json(first / "metrics.json")
    replayed = load_json(then / "metrics.json")
    assert replayed["val_acc"]["values"] == trained["finetune.val_acc"]["values"]
    assert replayed["val_acc"]["steps"] == trained["finetune.val_acc"]["steps"]
    assert result["test_acc"] == replayed["test_acc"]["values"][-1]
    assert (then / "selected.pt").is_file()


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


@pytest.mark.parametrize("name, decoder", [("fixmatch_mae", False), ("semi_mae_mae", True), ("ssmae_mae", True)])
def test_every_method_can_start_from_the_cached_mae_encoder(shared_start, name, decoder):
    """The same MAE stage (one per seed) as mae_finetune's, loaded bit for bit: the encoder, and
    the decoder for a method that reconstructs."""
    runs = shared_start["runs"]
    info = load_json(runs[name] / "info.json")
    assert info["stages"]["pretrain"]["reused"]
    assert info["stages"]["pretrain"]["key"] == load_json(runs["mae_finetune"] / "info.json")["stages"]["pretrain"]["key"]
    pretrained, _ = stage_files(runs[name], "pretrain")
    init = info["init"]
    assert init["encoder_sha256"] == digest(pretrained["model"]) and init["head"].startswith("re-drawn")
    assert ("decoder" in init["loaded"]) == decoder
    if decoder:
        assert init["decoder_sha256"] == digest(pretrained["model"], "decoder")
    assert info["start"] == "MAE 10 steps"
    assert load_json(runs["fixmatch_mae"] / "info.json")["start"] == "MAE 10 steps"


def test_init_from_reads_the_suites_own_stage_and_run_folders(shared_start, tmp_path):
    """--init-from a cached stage (its final.pt) or a run (its checkpoint or selected model):
    the encoder, the decoder where the method reconstructs, and the suite's own head."""
    from bench.train import checkpoint
    runs = shared_start["runs"]
    stage_dir = Path(load_json(runs["ssmae_mae"] / "info.json")["stages"]["pretrain"]["dir"])
    out = bench(["run", "semi_mae", *SHORT_ARGS, "--init-from", str(stage_dir), "--results-dir", str(tmp_path / "a")],
                shared_start["cache"])
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = run_dirs(tmp_path / "a")
    info = load_json(run / "info.json")
    final = checkpoint.load(stage_dir / "final.pt")["model"]
    assert info["init_from"]["layout"] == "ssvit-bench" and "decoder" in info["init_from"]["loaded"]
    assert info["init"]["encoder_sha256"] == digest(final) and info["init"]["decoder_sha256"] == digest(final, "decoder")
    assert "pretrain" not in (info.get("stages") or {}) and info["start"].startswith("file final.pt")
    # a run's folder: a fine-tuned classifier, its head included
    out = bench(["run", "fixmatch", *SHORT_ARGS, "--init-from", str(runs["semi_vit"]), "--results-dir",
                 str(tmp_path / "b")], shared_start["cache"])
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = run_dirs(tmp_path / "b")
    info = load_json(run / "info.json")
    saved = checkpoint.load(runs["semi_vit"] / "checkpoint.pt")["model"]
    assert info["init_from"]["head_loaded"] and info["init"]["head_sha256"] == digest(saved, "head")
    assert info["init"]["encoder_sha256"] == digest(saved)


def test_a_stage_kept_with_the_published_results_is_copied_in_not_retrained(shared_start, tmp_path):
    """A results folder whose cache lacks the seed's MAE stage but whose published/stages keeps it:
    the plan counts it as built, and the run copies it in, weight for weight, without training it."""
    import shutil
    from bench.run.stages import built_stage_configs
    runs = shared_start["runs"]
    pretrain = load_json(runs["mae_finetune"] / "info.json")["stages"]["pretrain"]
    kept = tmp_path / "results" / "published" / "stages" / "cifar10-smoke" / pretrain["key"]
    shutil.copytree(pretrain["dir"], kept, ignore=shutil.ignore_patterns(".lock", "checkpoint.pt"))
    assert [c["method"] for c in built_stage_configs(tmp_path / "results")] == ["mae_pretrain"]
    out = bench(["run", "fixmatch", *SHORT_ARGS, "--start", "mae", "--tau", "0.3",
                 "--results-dir", str(tmp_path / "results")], shared_start["cache"])
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = run_dirs(tmp_path / "results")
    info = load_json(run / "info.json")["stages"]["pretrain"]
    assert info["reused"] and info["key"] == pretrain["key"]
    cached = Path(info["dir"])
    assert cached == (tmp_path / "results" / "stages" / pretrain["key"]).resolve()
    assert (cached / "final.pt").read_bytes() == (kept / "final.pt").read_bytes()
    assert not (cached / "checkpoint.pt").exists()   # nothing trained here
