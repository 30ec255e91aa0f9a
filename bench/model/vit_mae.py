"""One module: a timm ViT classifier whose encoder also serves a masked-autoencoder branch.

Reads top-down: patchify -> random_masking -> forward_encoder_masked -> forward_decoder ->
mae_loss. The encoder is any timm `VisionTransformer`, chosen by name; masked encoding reuses
timm's own patch embedding and `_pos_embed`, so class / register / distillation tokens (the
"prefix" tokens) and `no_embed_class` position tables are handled exactly as timm handles them.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import timm
import torch
from timm.layers import DropPath
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from bench.errors import UsageError


@dataclass
class DecoderConfig:
    dim: int = 512
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0


def sincos_2d(dim: int, h: int, w: int) -> Tensor:
    """Fixed 2-D sin-cos position table (h*w, dim), positions row-major. The first half of the
    channels encodes the row, the second half the column, each as dim/4 sines then dim/4 cosines
    of geometrically spaced frequencies."""
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    n = dim // 4
    freqs = 1.0 / 10000.0 ** (torch.arange(n, dtype=torch.float64) / n)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")

    def encode(coord: Tensor) -> Tensor:
        angles = coord.reshape(-1, 1) * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class MAEDecoder(nn.Module):
    """Light transformer decoder: encoder tokens (prefix + visible) -> pixels of every patch.

    Visible tokens are embedded, mask tokens appended, the sequence is put back into the original
    patch order, position embeddings are added (prefix tokens keep their own slots), and the
    prediction for the prefix tokens is dropped."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], num_prefix: int, patch_pixels: int,
                 cfg: DecoderConfig, sincos: bool = False):
        super().__init__()
        self.num_prefix = num_prefix
        num_patches = grid[0] * grid[1]
        self.embed = nn.Linear(embed_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_prefix + num_patches, cfg.dim), requires_grad=not sincos)
        self.blocks = nn.Sequential(*[Block(cfg.dim, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True)
                                      for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.pred = nn.Linear(cfg.dim, patch_pixels)

        with torch.no_grad():
            if sincos:  # prefix slots stay zero
                self.pos_embed[0, num_prefix:] = sincos_2d(cfg.dim, *grid)
            else:
                nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(latent)
        prefix, visible = x[:, :self.num_prefix], x[:, self.num_prefix:]
        B, L = ids_restore.shape
        masked = self.mask_token.to(x.dtype).expand(B, L - visible.shape[1], -1)
        tokens = torch.cat([visible, masked], dim=1)  # shuffled order: kept first, then removed
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([prefix, tokens], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix:])


class ViTMAE(nn.Module):
    """timm ViT (encoder + classifier head) with masked encoding and an optional MAE decoder."""

    def __init__(self, vit: VisionTransformer, decoder: DecoderConfig | None = None,
                 norm_pix_loss: bool = False, pos_embed: str = "learn"):
        super().__init__()
        self.vit = vit
        self.patch_size = vit.patch_embed.patch_size[0]
        self.grid = tuple(vit.patch_embed.grid_size)
        self.num_patches = vit.patch_embed.num_patches
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.num_layers = len(vit.blocks)
        self.norm_pix_loss = norm_pix_loss
        sincos = pos_embed == "sincos"
        if sincos and vit.pos_embed is not None:
            # no_embed_class models hold patch positions only; others have prefix slots first (kept zero)
            start = vit.pos_embed.shape[1] - self.num_patches
            with torch.no_grad():
                vit.pos_embed.zero_()
                vit.pos_embed[0, start:] = sincos_2d(vit.embed_dim, *self.grid)
            vit.pos_embed.requires_grad_(False)
        self.decoder = None
        self.mae_norm = None
        if decoder is not None:
            self.decoder = MAEDecoder(vit.embed_dim, self.grid, self.num_prefix_tokens,
                                      self.patch_size ** 2 * 3, decoder, sincos=sincos)
            if isinstance(vit.norm, nn.Identity):
                # Average-pooling ViTs move the final norm to `fc_norm`, after pooling; MAE normalises
                # the latent tokens before decoding, so the MAE branch gets a norm of its own.
                self.mae_norm = nn.LayerNorm(vit.embed_dim, eps=1e-6)

    # -- classification ------------------------------------------------------------------------
    def forward(self, imgs: Tensor) -> Tensor:
        return self.vit(imgs)

    def features(self, imgs: Tensor) -> Tensor:
        """Pooled pre-logits features (what the classifier head sees)."""
        return self.vit.forward_head(self.vit.forward_features(imgs), pre_logits=True)

    # -- masked autoencoding -------------------------------------------------------------------
    def patchify(self, imgs: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, L, p*p*3): patches row-major (timm's order), pixels (p, p, 3) inside."""
        p = self.patch_size
        B, C, H, W = imgs.shape
        x = imgs.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x: Tensor) -> Tensor:
        """Inverse of `patchify` for this model's patch grid."""
        p, (h, w) = self.patch_size, self.grid
        x = x.reshape(x.shape[0], h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], 3, h * p, w * p)

    def random_masking(self, x: Tensor, mask_ratio: float, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample, keep int(L * (1 - mask_ratio)) tokens: those with the smallest `noise`
        (B, L), uniform numbers the caller draws per image (`Method.reconstruction_loss`), so an
        image's mask depends on its own row of the step only. Returns the kept tokens (in
        shuffled order), the mask (B, L) in the original order with 1 = removed, and
        `ids_restore`, which undoes the shuffle."""
        B, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_kept = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, D))
        mask = (ids_restore >= keep).float()  # a token's rank in the shuffle decides if it is kept
        return x_kept, mask, ids_restore

    def forward_encoder_masked(self, imgs: Tensor, mask_ratio: float,
                               noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode only the kept patches, without stochastic depth (as in MAE pretraining: the
        masking is the regulariser). Returns (latent (B, prefix + keep, D), mask, ids_restore),
        the latent normalised as MAE feeds it to the decoder."""
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(imgs))  # timm adds positions and prepends prefix tokens
        # vit.patch_drop is skipped on purpose: masking is the patch dropout here, and a second
        # random drop would break ids_restore (build_model never enables it).
        n = self.num_prefix_tokens
        patches, mask, ids_restore = self.random_masking(x[:, n:], mask_ratio, noise)
        x = vit.norm_pre(torch.cat([x[:, :n], patches], dim=1))
        with self._no_drop_path():
            if vit.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(vit.blocks, x)
            else:
                x = vit.blocks(x)
        x = vit.norm(x)
        if self.mae_norm is not None:
            x = self.mae_norm(x)
        return x, mask, ids_restore

    @contextlib.contextmanager
    def _no_drop_path(self) -> Iterator[None]:
        active = [m for m in self.vit.blocks.modules() if isinstance(m, DropPath) and m.training]
        for m in active:
            m.training = False
        try:
            yield
        finally:
            for m in active:
                m.training = True

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        if self.decoder is None:
            raise RuntimeError("this model was built without an MAE decoder (with_decoder=False)")
        return self.decoder(latent, ids_restore)

    def mae_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch (over its p*p*3 values), averaged over removed patches only.
        With norm_pix_loss the target is each patch normalised by its own mean and (unbiased)
        variance: (t - mean) / sqrt(var + 1e-6)."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward_mae(self, imgs: Tensor, mask_ratio: float, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(MAE loss, predicted patches, mask) of `imgs` with `mask_ratio` of patches removed:
        those with the largest `noise` (B, L)."""
        latent, mask, ids_restore = self.forward_encoder_masked(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.mae_loss(imgs, pred, mask), pred, mask

    # -- optimisation metadata -----------------------------------------------------------------
    _EMBEDDING_PREFIXES = ("vit.patch_embed.", "vit.pos_embed", "vit.cls_token", "vit.reg_token",
                           "vit.dist_token", "vit.norm_pre.")

    def layer_id(self, param_name: str) -> int:
        """Layer-decay depth: 0 for embeddings, i + 1 for encoder block i, num_layers + 1 for the
        rest (final norm, pooling, head, decoder)."""
        if param_name.startswith("vit.blocks."):
            return int(param_name.split(".")[2]) + 1
        if param_name.startswith(self._EMBEDDING_PREFIXES):
            return 0
        return self.num_layers + 1

    def no_weight_decay(self) -> set[str]:
        """Full names of embedding-like parameters that must not be weight-decayed."""
        names = {f"vit.{n}" for n in self.vit.no_weight_decay()}
        names |= {"vit.pos_embed", "vit.cls_token", "vit.reg_token", "decoder.mask_token", "decoder.pos_embed"}
        return {n for n, _ in self.named_parameters() if n in names}


def _unknown(name: str) -> UsageError:
    return UsageError(f"unknown timm ViT '{name}'; see `timm.list_models('vit_*')`")


def _default_patch_size(name: str) -> int | None:
    """The name's patch size, read from a parameter-free (meta-device) instance; also rejects
    names that are not VisionTransformers. None when the probe itself cannot be built."""
    if not timm.is_model(name):
        raise _unknown(name)
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False)
    except Exception:  # let the real build decide
        return None
    if not isinstance(probe, VisionTransformer):
        raise _unknown(name)
    return probe.patch_embed.patch_size[0]


def build_model(cfg: dict[str, Any], num_classes: int, with_decoder: bool) -> ViTMAE:
    """The run's model from its flat config: encoder by timm name with size overrides (None keeps
    the name's value), position embedding, and the MAE decoder when `with_decoder`."""
    name, img_size = cfg["encoder"], cfg["img_size"]
    default_patch = _default_patch_size(name)  # first, so unknown / non-ViT names fail fast
    patch_size = cfg.get("patch_size") or default_patch
    if patch_size is not None and img_size % patch_size:
        raise UsageError(f"img_size {img_size} is not divisible by patch_size {patch_size}; pick sizes that divide")
    pos_embed = cfg.get("pos_embed", "learn")
    if pos_embed not in ("learn", "sincos"):
        raise UsageError(f"pos_embed must be 'learn' or 'sincos', got {pos_embed!r}")
    overrides = {k: cfg[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "global_pool")
                 if cfg.get(k) is not None}
    if cfg.get("drop_path") is not None:
        overrides["drop_path_rate"] = cfg["drop_path"]
    try:
        vit = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size, **overrides)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot build encoder '{name}' with {overrides}: {why}; adjust the model options") from None
    if not isinstance(vit, VisionTransformer):
        raise _unknown(name)
    if any(s % p for s, p in zip(vit.patch_embed.img_size, vit.patch_embed.patch_size)):
        raise UsageError(f"img_size {img_size} is not divisible by patch_size {vit.patch_embed.patch_size[0]}; "
                         f"pick sizes that divide")
    decoder = None
    if with_decoder:
        defaults = asdict(DecoderConfig())
        decoder = DecoderConfig(**{k: cfg.get(f"decoder_{k}") or v for k, v in defaults.items()})
    if pos_embed == "sincos":
        dims = [vit.embed_dim] + ([decoder.dim] if decoder else [])
        if any(d % 4 for d in dims):
            raise UsageError(f"pos_embed 'sincos' needs encoder/decoder widths divisible by 4, got {dims}")
        if vit.pos_embed is None:
            raise UsageError(f"'{name}' has no position embedding to make sin-cos; use pos_embed 'learn'")
    return ViTMAE(vit, decoder, norm_pix_loss=bool(cfg.get("norm_pix_loss", False)), pos_embed=pos_embed)
