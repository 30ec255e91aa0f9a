"""Mixup / CutMix on device batches, shared by supervised regularisation and pseudo-mixup.

Every mix is per sample: image i is mixed with its partner (drawn over the whole set, across
ranks: `partners_of`) at weight lam[i], by mixup (a convex combination) or cutmix (a pasted box). A cutmix box is clipped at the border, so its lambda is
corrected to the area that really stayed the sample's own; targets are mixed with that lambda.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench.data.batch import Images
from bench.distributed import all_cat
from bench.data.randomness import Draws


def one_hot_smooth(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot targets with label smoothing: (1 - s) on the class plus s / K everywhere."""
    out = torch.full((len(y), num_classes), smoothing / num_classes, device=y.device)
    return out.scatter_add_(1, y.view(-1, 1), torch.full((len(y), 1), 1.0 - smoothing, device=y.device))


def sample_mix_params(draws: Draws, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                      host) -> tuple[Tensor, Tensor, Tensor]:
    """One (lambda, mode) per batch as in timm's Mixup, cutmix with probability `switch_prob`
    when both are on, from the host generator `host` (no device sync); partners drawn over the
    whole set of images `draws` is for."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or host.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(host.beta(alpha, alpha))
    perm = draws.partners()
    n, device = draws.n, perm.device
    return (torch.full((n,), lam, device=device), perm,
            torch.full((n,), use_cutmix, dtype=torch.bool, device=device))


def partners_of(values: Tensor, perm: Tensor, images: Images) -> Tensor:
    """For each of `images`, the `values` row of its partner: the image at position perm[p] of
    the whole set, p its own position. Across ranks the set's rows are gathered first (a
    partner may live on another rank), so pairs do not depend on the world size."""
    return all_cat(values)[perm[images.positions]]


def prob_pseudo_mix_lambda(conf: Tensor, conf_partner: Tensor) -> Tensor:
    """Semi-ViT's probabilistic pseudo-mixup weight: lambda_i = p_i / (p_i + p_partner(i))."""
    return conf / (conf + conf_partner).clamp(min=1e-12)


def cutmix_masks(lam: Tensor, height: int, width: int, draws: Draws) -> Tensor:
    """(B, H, W) bool, True inside each sample's pasted box: side sqrt(1 - lam) of the image,
    random centre, clipped at the border."""
    n, dev = len(lam), lam.device
    r = (1 - lam).clamp(0, 1).sqrt()
    bh, bw = (r * height).round(), (r * width).round()
    cy = draws.randint(0, height).to(dev)
    cx = draws.randint(0, width).to(dev)
    y0, y1 = (cy - bh // 2).clamp(0, height), (cy - bh // 2 + bh).clamp(0, height)
    x0, x1 = (cx - bw // 2).clamp(0, width), (cx - bw // 2 + bw).clamp(0, width)
    rows = torch.arange(height, device=dev).view(1, height, 1)
    cols = torch.arange(width, device=dev).view(1, 1, width)
    return ((rows >= y0.view(n, 1, 1)) & (rows < y1.view(n, 1, 1)) &
            (cols >= x0.view(n, 1, 1)) & (cols < x1.view(n, 1, 1)))


def mix(x: Tensor, targets: Tensor, lam: Tensor, x_partner: Tensor, t_partner: Tensor, use_cutmix: Tensor,
        draws: Draws) -> tuple[Tensor, Tensor, Tensor]:
    """Mix images (B, C, H, W) and soft targets (B, K) with their partners' (`partners_of`);
    returns the mixed images, the mixed targets and the effective lambda (area-corrected for
    cutmix)."""
    n, _, h, w = x.shape
    lam = lam.to(x.dtype) if lam.is_floating_point() else lam.float()
    box = cutmix_masks(lam, h, w, draws)
    cut_lam = 1 - box.flatten(1).float().mean(1)
    use_cutmix = use_cutmix.view(n)
    lam_eff = torch.where(use_cutmix, cut_lam, lam)
    lam_img = lam.view(n, 1, 1, 1)
    mixed = torch.where(use_cutmix.view(n, 1, 1, 1),
                        torch.where(box[:, None], x_partner, x),
                        lam_img * x + (1 - lam_img) * x_partner)
    t = lam_eff.view(n, 1).to(targets.dtype)
    return mixed, t * targets + (1 - t) * t_partner, lam_eff
