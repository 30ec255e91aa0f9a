"""bench.model.vit_mae: timm ViT + masked encoding + MAE decoder, on tiny CPU models."""
from __future__ import annotations

import pytest
import timm
import torch

from bench.errors import UsageError
from bench.model.vit_mae import DecoderConfig, ViTMAE, build_model, sincos_2d

K = 5


def tiny_cfg(**kw) -> dict:
    cfg = dict(encoder="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
               drop_path=0.0, global_pool="token", pos_embed="learn", decoder_dim=32, decoder_depth=1,
               decoder_heads=2, norm_pix_loss=False)
    cfg.update(kw)
    return cfg


def tiny(with_decoder: bool = True, seed: int = 0, **kw) -> ViTMAE:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**kw), K, with_decoder=with_decoder)


def noise(b: int = 4, patches: int = 64, seed: int = 0) -> torch.Tensor:
    """Per-image masking noise, as `Method.reconstruction_loss` draws it."""
    return torch.rand(b, patches, generator=torch.Generator().manual_seed(seed))


def images(b: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- classification --------------------------------------------------------------------------
def test_forward_and_features_shapes_without_decoder():
    model = tiny(with_decoder=False)
    assert model.decoder is None
    x = images()
    assert model(x).shape == (4, K)
    assert model.features(x).shape == (4, 64)
    assert (model.patch_size, model.num_patches, model.num_prefix_tokens, model.num_layers) == (4, 64, 1, 2)
    with pytest.raises(RuntimeError, match="without an MAE decoder"):
        model.forward_mae(x, 0.75, noise())


# -- patchify --------------------------------------------------------------------------------
def test_patchify_roundtrip_and_row_major_order():
    model = tiny(with_decoder=False)
    x = images(2)
    patches = model.patchify(x)
    assert patches.shape == (2, 64, 48)
    assert torch.equal(model.unpatchify(patches), x)
    p, w = 4, 8
    for i in (0, 1, 7, 8, 21, 63):
        r, c = divmod(i, w)
        block = x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(patches[:, i], block)


def test_patchify_order_matches_timm_patch_embed():
    model = tiny(with_decoder=False)
    x = images(2)
    proj = model.vit.patch_embed.proj  # Conv2d(3, D, p, stride p)
    weight = proj.weight.permute(0, 2, 3, 1).reshape(proj.weight.shape[0], -1)  # (D, p*p*3) in (p, p, 3) order
    with torch.no_grad():
        tokens = model.vit.patch_embed(x)
        linear = model.patchify(x) @ weight.T + proj.bias
    torch.testing.assert_close(tokens, linear, atol=1e-5, rtol=1e-5)


# -- masking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_random_masking_counts_and_restore(ratio):
    model = tiny(with_decoder=False)
    B, L, D = 6, 64, 3
    x = torch.arange(B * L, dtype=torch.float32).reshape(B, L, 1).expand(B, L, D).clone()
    x_kept, mask, ids_restore = model.random_masking(x, ratio, noise(B))
    keep = int(L * (1 - ratio))
    assert x_kept.shape == (B, keep, D)
    assert mask.shape == (B, L) and ids_restore.shape == (B, L)
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - keep)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for b in range(B):
        kept_positions = (mask[b] == 0).nonzero().flatten()
        assert torch.equal(x_kept[b, :, 0].sort().values.long() - b * L, kept_positions)
    # un-shuffling (as the decoder does) puts every kept token back at its original position
    padded = torch.cat([x_kept, torch.full((B, L - keep, D), -1.0)], dim=1)
    restored = torch.gather(padded, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    assert torch.equal(restored[mask == 0], x[mask == 0])
    assert torch.all(restored[mask == 1] == -1)


def test_random_masking_removes_the_tokens_with_the_largest_noise():
    model = tiny(with_decoder=False)
    x = torch.randn(8, 64, 4)
    z = noise(8, seed=3)
    _, mask, _ = model.random_masking(x, 0.75, z)
    assert len({tuple(m.tolist()) for m in mask}) == 8       # every image its own mask
    cut = z.sort(dim=1).values[:, 16:17]                     # the 17th smallest noise of each row
    assert torch.equal(mask.bool(), z >= cut)                # the 16 smallest are kept
    torch.manual_seed(4)  # the global RNG plays no part: the noise alone decides
    assert torch.equal(model.random_masking(x, 0.75, z)[1], mask)
    assert not torch.equal(model.random_masking(x, 0.75, noise(8, seed=5))[1], mask)


# -- masked encoding for several token layouts -----------------------------------------------
LAYOUTS = {
    "cls+token-pool": dict(),
    "cls+avg-pool": dict(global_pool="avg"),
    "no-cls+avg": dict(encoder="vit_medium_patch16_gap_240", global_pool="avg"),
    "cls+4reg,no_embed_class": dict(encoder="vit_small_patch14_reg4_dinov2", global_pool="token"),
    "1reg,no-cls+avg": dict(encoder="vit_wee_patch16_reg1_gap_256", global_pool="avg"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("pos_embed", ["learn", "sincos"])
def test_masked_encoder_and_decoder_for_token_layouts(layout, pos_embed):
    kw = LAYOUTS[layout]
    if not timm.is_model(kw.get("encoder", "vit_tiny_patch16_224")):
        pytest.skip(f"this timm has no {kw['encoder']}")
    model = tiny(pos_embed=pos_embed, **kw).eval()
    n = model.num_prefix_tokens
    x = images(3)
    latent, mask, ids_restore = model.forward_encoder_masked(x, 0.75, noise(3))
    assert latent.shape == (3, n + 16, 64)
    assert mask.shape == (3, 64)
    pred = model.forward_decoder(latent, ids_restore)
    assert pred.shape == (3, 64, 48)
    loss, _, _ = model.forward_mae(x, 0.75, noise(3))
    assert torch.isfinite(loss)
    assert model(x).shape == (3, K)
    # with nothing removed, the masked path is the plain encoder (then MAE's latent norm, where
    # the encoder's own final norm moved behind the pooling) up to the token shuffle
    with torch.no_grad():
        full = model.vit.forward_features(x)
        if model.mae_norm is not None:
            full = model.mae_norm(full)
        latent, mask, ids_restore = model.forward_encoder_masked(x, 0.0, noise(3))
    assert mask.sum() == 0
    unshuffled = torch.gather(latent[:, n:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, 64))
    torch.testing.assert_close(latent[:, :n], full[:, :n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unshuffled, full[:, n:], atol=1e-5, rtol=1e-4)


def test_avg_pool_models_normalise_the_latent_before_decoding():
    """timm moves an average-pooling ViT's final norm to `fc_norm` (after pooling); the MAE branch
    must still decode normalised tokens, through a norm that its loss trains."""
    model = tiny(global_pool="avg")
    assert isinstance(model.vit.norm, torch.nn.Identity) and model.mae_norm is not None
    latent, _, _ = model.forward_encoder_masked(images(), 0.75, noise())
    torch.testing.assert_close(latent.mean(-1), torch.zeros(latent.shape[:2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(latent.std(-1, unbiased=False), torch.ones(latent.shape[:2]), atol=1e-2, rtol=0)
    model.forward_mae(images(), 0.75, noise())[0].backward()
    assert model.mae_norm.weight.grad.abs().sum() > 0
    assert tiny(global_pool="token").mae_norm is None  # the encoder's own final norm serves
    assert tiny(global_pool="avg", with_decoder=False).mae_norm is None


def test_masked_encoding_runs_without_stochastic_depth():
    model = tiny(drop_path=0.5, depth=4).train()
    x = images()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # the classification pass drops paths
        a = model.forward_encoder_masked(x, 0.75, noise(seed=2))[0]
        b = model.forward_encoder_masked(x, 0.75, noise(seed=2))[0]
    assert torch.equal(a, b)
    assert model.vit.blocks[1].drop_path1.training  # switched off for the masked pass only


def test_layouts_have_the_expected_prefix_tokens():
    expected = {"cls+token-pool": 1, "no-cls+avg": 0, "cls+4reg,no_embed_class": 5, "1reg,no-cls+avg": 1}
    for layout, n in expected.items():
        kw = LAYOUTS[layout]
        if timm.is_model(kw.get("encoder", "vit_tiny_patch16_224")):
            assert tiny(with_decoder=False, **kw).num_prefix_tokens == n, layout


# -- loss ------------------------------------------------------------------------------------
def masked_setup(norm_pix: bool = False):
    model = tiny(norm_pix_loss=norm_pix)
    x = images(2)
    _, mask, _ = model.random_masking(torch.zeros(2, 64, 1), 0.75, noise(2, seed=5))
    return model, x, mask


def test_mae_loss_counts_only_masked_patches():
    model, x, mask = masked_setup()
    target = model.patchify(x)
    pred = torch.where(mask.bool().unsqueeze(-1), target, torch.full_like(target, 1e3))
    assert model.mae_loss(x, pred, mask).item() == 0.0
    b, i = (mask == 1).nonzero()[0].tolist()
    pred[b, i] = target[b, i] + torch.linspace(-2, 2, 48)
    patch_mse = ((pred[b, i] - target[b, i]) ** 2).mean()
    torch.testing.assert_close(model.mae_loss(x, pred, mask), patch_mse / mask.sum())


def test_norm_pix_loss_normalises_each_patch():
    model, x, mask = masked_setup(norm_pix=True)
    x = 0.2 * x + 0.5  # image-like statistics, so normalising each patch visibly changes it
    raw = model.patchify(x)
    normed = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    assert model.mae_loss(x, normed, mask).item() < 1e-10
    assert model.mae_loss(x, raw, mask).item() > 0.1
    pred = torch.randn_like(raw)
    expected = (((pred - normed) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(model.mae_loss(x, pred, mask), expected)


def test_mae_gradients_reach_encoder_blocks_and_decoder():
    model = tiny()
    loss, pred, mask = model.forward_mae(images(), 0.75, noise())
    loss.backward()
    params = dict(model.named_parameters())
    for name in ("vit.patch_embed.proj.weight", "vit.pos_embed", "vit.cls_token", "vit.blocks.0.attn.qkv.weight",
                 "vit.blocks.1.mlp.fc2.weight", "decoder.embed.weight", "decoder.mask_token",
                 "decoder.blocks.0.attn.qkv.weight", "decoder.pred.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert params["vit.head.weight"].grad is None  # the classifier is not part of the MAE branch


def test_mae_loss_falls_on_a_fixed_batch():
    model = tiny(seed=2).train()
    x = images(8, seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def fixed_mask_loss() -> float:
        with torch.no_grad():
            return model.forward_mae(x, 0.75, noise(8, seed=11))[0].item()

    before = fixed_mask_loss()
    for i in range(20):
        loss, _, _ = model.forward_mae(x, 0.75, noise(8, seed=100 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_mask_loss() < 0.9 * before


# -- optimisation metadata -------------------------------------------------------------------
def test_layer_id_and_no_weight_decay():
    model = tiny(depth=3)
    L = model.num_layers
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert set(ids.values()) == set(range(L + 2))
    for name, i in ids.items():
        if name.startswith("vit.blocks."):
            assert i == int(name.split(".")[2]) + 1
        elif name.startswith(("vit.patch_embed", "vit.pos_embed", "vit.cls_token")):
            assert i == 0
        else:
            assert i == L + 1, name
    nwd = model.no_weight_decay()
    assert nwd <= set(ids)
    assert {"vit.pos_embed", "vit.cls_token", "decoder.mask_token", "decoder.pos_embed"} <= nwd
    if timm.is_model("vit_small_patch14_reg4_dinov2"):
        reg = tiny(encoder="vit_small_patch14_reg4_dinov2")
        assert "vit.reg_token" in reg.no_weight_decay()
        assert reg.layer_id("vit.reg_token") == 0


# -- sin-cos position embedding --------------------------------------------------------------
def test_sincos_is_fixed_frozen_and_deterministic():
    a, b = tiny(pos_embed="sincos", seed=0), tiny(pos_embed="sincos", seed=1)
    for m in (a, b):
        assert not m.vit.pos_embed.requires_grad and not m.decoder.pos_embed.requires_grad
    assert torch.equal(a.vit.pos_embed, b.vit.pos_embed)
    assert torch.equal(a.decoder.pos_embed, b.decoder.pos_embed)
    assert torch.all(a.vit.pos_embed[0, 0] == 0) and torch.all(a.decoder.pos_embed[0, 0] == 0)
    assert torch.equal(a.vit.pos_embed[0, 1:], sincos_2d(64, 8, 8))
    assert torch.equal(a.decoder.pos_embed[0, 1:], sincos_2d(32, 8, 8))
    table = sincos_2d(8, 2, 3)  # rows in the first half, columns in the second
    assert torch.equal(table[0, :4], table[1, :4]) and not torch.equal(table[0, 4:], table[1, 4:])
    assert torch.equal(table[0, 4:], table[3, 4:]) and not torch.equal(table[0, :4], table[3, :4])
    loss, _, _ = a.forward_mae(images(), 0.75, noise())
    loss.backward()
    assert a.vit.pos_embed.grad is None and a.decoder.pos_embed.grad is None
    learned = tiny(seed=0)
    assert learned.vit.pos_embed.requires_grad and learned.decoder.pos_embed.requires_grad


def test_decoder_init():
    model = tiny(decoder_depth=2)
    dec = model.decoder
    for name, m in dec.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0), name
            bound = (6 / (m.weight.shape[0] + m.weight.shape[1])) ** 0.5
            assert m.weight.abs().max() <= bound, name
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert 0.005 < dec.mask_token.std() < 0.05
    assert DecoderConfig().dim == 512 and len(dec.blocks) == 2


# -- usage errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_does_not_exist", "resnet18"])
def test_unknown_or_non_vit_name(name):
    with pytest.raises(UsageError, match=r"unknown timm ViT '.*'; see `timm.list_models\('vit_\*'\)`"):
        build_model(tiny_cfg(encoder=name), K, with_decoder=False)


@pytest.mark.parametrize("img_size,patch_size", [(30, 4), (40, None)])  # None: the name's 16
def test_img_size_not_divisible_by_patch(img_size, patch_size):
    with pytest.raises(UsageError, match="not divisible"):
        build_model(tiny_cfg(img_size=img_size, patch_size=patch_size), K, with_decoder=False)


def test_patch_size_none_uses_the_names():
    model = build_model(tiny_cfg(patch_size=None), K, with_decoder=True)
    assert model.patch_size == 16 and model.num_patches == 4
    assert model.forward_mae(images(2), 0.5, noise(2, 4))[1].shape == (2, 4, 16 * 16 * 3)
