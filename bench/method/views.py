"""Augmented views made in batch on the device, from uint8 images to normalised model inputs.

Every view is one per-sample affine resampling (`affine_grid` + `grid_sample`, mirrored borders)
that does the crop, flip, geometric RandAugment ops and the resize to the model's resolution in
a single pass, plus batched colour ops (`torch.where` over per-sample op choices) and Cutout.
Every random number comes from the run's `StepRandom`, drawn per image by its row in the step
(`bench.data.randomness`): no per-image Python, same code on CPU.

- eval:   resize only.
- weak:   random translation by up to `pad_frac` of the side (= reflect-pad + random crop) + flip.
- strong: weak + `randaug_ops` RandAugment ops, each applied with probability `randaug_prob` at a
          random strength up to `randaug_mag`/10, + Cutout (FixMatch's RandAugmentMC).
Geometric ops fill from mirrored borders rather than a constant grey: the whole view stays one
resampling pass, and mirrored content keeps the image statistics the weak view has.
- mae:    random resized crop (scale `mae_scale`, ratio 3/4..4/3) + flip, as in MAE pretraining.

For 224-px protocols (ImageNet; Semi-ViT, MAE fine-tuning) the same views take `crop="rrc"`: a
RandomResizedCrop of area share U[`crop_scale_min`, 1] and aspect 3/4..4/3 instead of the
translation, `jitter` (brightness, contrast, saturation factors in [1 - j, 1 + j], on the weak
view: Semi-ViT's 0.4), and `erase_prob` (random erasing of 2-33 % of a strong view, filled with a
random colour per channel: timm's "rand" mode; Semi-ViT uses 0.25 in per-pixel mode). Evaluation
with `eval_crop` < 1 resizes to out_size / eval_crop and takes the centre crop (0.875: the papers'
resize 256, centre crop 224).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.data.batch import Images
from bench.data.randomness import Draws, StepRandom

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandAugment ops. Geometric ops go into the affine matrix; colour ops act on pixels.
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
COLOUR_OPS = ("identity", "brightness", "contrast", "color", "sharpness", "posterize", "solarize",
              "autocontrast", "equalize")
OPS = GEOMETRIC_OPS + COLOUR_OPS
MAX_ROTATE = math.radians(30)
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3   # fraction of the side
MAX_ENHANCE = 0.9     # brightness/contrast/colour/sharpness factor 1 +- this


def _recorded(view):
    """A public view whose calls `Views.recording` can collect (bench speed re-times them)."""
    def call(self, x):
        if self._calls is not None:
            self._calls.append((view.__name__, x))
        return view(self, x)
    call.__name__, call.__doc__ = view.__name__, view.__doc__
    return call


class Views:
    def __init__(self, out_size: int, random: StepRandom, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 pad_frac: float = 0.125, randaug_ops: int = 2, randaug_mag: float = 10.0,
                 randaug_prob: float = 0.5, cutout_frac: float = 0.5,
                 mae_scale: tuple[float, float] = (0.2, 1.0), crop: str = "translate", crop_scale_min: float = 0.08,
                 jitter: float = 0.0, erase_prob: float = 0.0, eval_crop: float = 1.0, hflip: bool = True):
        self.out_size = out_size
        self.hflip = hflip  # False for images a mirror changes (digits)
        self.crop, self.crop_scale_min, self.jitter = crop, crop_scale_min, jitter
        self.erase_prob, self.eval_crop = erase_prob, eval_crop
        self.random = random
        self.pad_frac = pad_frac
        self.randaug_ops = randaug_ops
        self.randaug_mag = randaug_mag
        self.randaug_prob = randaug_prob
        self.cutout_frac = cutout_frac
        self.mae_scale = mae_scale
        dev = random.device
        self.mean = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=dev).view(1, 3, 1, 1)
        self._calls: list | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[str, Images | Tensor]]]:
        """Collect (view, input) of every view made inside the block: `bench speed` times a
        step's views alone by making them again."""
        self._calls = []
        try:
            yield self._calls
        finally:
            self._calls = None

    # -- the views: each takes `Images` (or a bare uint8 tensor) -------------------------------
    @_recorded
    def eval(self, x: Images | Tensor) -> Tensor:
        img = _to_float(_pixels(x))
        size = self.out_size if self.eval_crop >= 1 else int(round(self.out_size / self.eval_crop))
        if img.shape[-1] != size or img.shape[-2] != size:
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if size != self.out_size:  # the centre crop of the papers' evaluation
            top = (size - self.out_size) // 2
            img = img[:, :, top:top + self.out_size, top:top + self.out_size]
        return self._normalise(img)

    @_recorded
    def weak(self, x: Images | Tensor) -> Tensor:
        d, px = self.random.on(x), _pixels(x)
        theta = self._flip(d, self._crop(d, _identity(len(px), px.device), px.shape[1]))
        img = self._resample(_to_float(px), theta)
        if self.jitter > 0:
            img = self._jitter(d, img)
        return self._normalise(img)

    @_recorded
    def strong(self, x: Images | Tensor) -> Tensor:
        d, px = self.random.on(x), _pixels(x)
        n, dev = len(px), px.device
        theta = self._flip(d, self._crop(d, _identity(n, dev), px.shape[1]))
        img = _to_float(px)
        for _ in range(self.randaug_ops):
            op = d.randint(0, len(OPS))
            skipped = d.uniform() >= self.randaug_prob
            op = torch.where(skipped, OPS.index("identity"), op)
            strength = d.uniform() * (self.randaug_mag / 10)
            sign = torch.where(d.uniform() < 0.5, -1.0, 1.0)
            theta = theta @ _geometric(op, strength * sign)
            img = _colour(img, op - len(GEOMETRIC_OPS), strength, sign)
        img = self._resample(img, theta)
        out = self._normalise(self._cutout(d, img))
        return self._erase(d, out) if self.erase_prob > 0 else out

    @_recorded
    def mae(self, x: Images | Tensor) -> Tensor:
        d, px = self.random.on(x), _pixels(x)
        theta = self._resized_crop(d, len(px), px.device, *self.mae_scale)
        return self._normalise(self._resample(_to_float(px), self._flip(d, theta)))

    def labeled(self, x: Images | Tensor, kind: str) -> Tensor:
        return {"weak": self.weak, "strong": self.strong, "mae": self.mae, "eval": self.eval}[kind](x)

    # -- pieces --------------------------------------------------------------------------------
    def _crop(self, d: Draws, theta: Tensor, side: int) -> Tensor:
        if self.crop == "rrc":
            return self._resized_crop(d, len(theta), theta.device, self.crop_scale_min, 1.0)
        return self._translate(d, theta, side)

    def _resized_crop(self, d: Draws, n: int, dev, lo: float, hi: float) -> Tensor:
        """A random resized crop per image: area share U[lo, hi], aspect 3/4..4/3 (log-uniform),
        inside the image. A draw too wide or tall for the image is clamped to its side, where
        torchvision redraws up to ten times: large crops of extreme aspect come out a little
        squarer and smaller than torchvision's (one draw per image keeps the batch's streams
        fixed in (seed, step))."""
        area = lo + (hi - lo) * d.uniform()
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * d.uniform()
        sx = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # crop width / image width
        sy = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
        cx = (1 - sx) * (2 * d.uniform() - 1)  # crop centre keeps the crop inside
        cy = (1 - sy) * (2 * d.uniform() - 1)
        theta = _identity(n, dev)
        theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, sy, cx, cy
        return theta

    def _jitter(self, d: Draws, img: Tensor) -> Tensor:
        """Brightness, contrast and saturation, each by a factor in [1 - j, 1 + j] per image."""
        n, j = len(img), self.jitter
        b, c, s = (1 + j * (2 * d.uniform() - 1)).view(n, 1, 1, 1), (1 + j * (2 * d.uniform() - 1)).view(n, 1, 1, 1), \
            (1 + j * (2 * d.uniform() - 1)).view(n, 1, 1, 1)
        img = (img * b).clamp(0, 1)
        mean = _grey(img).mean(dim=(2, 3), keepdim=True)
        img = ((img - mean) * c + mean).clamp(0, 1)
        grey = _grey(img)
        return ((img - grey) * s + grey).clamp(0, 1)

    def _erase(self, d: Draws, img: Tensor) -> Tensor:
        """Random erasing with probability erase_prob: a box of 2-33 % of the area, aspect
        0.3..3.3, filled with one random colour per channel, U[-2, 2] in normalised units (as
        timm's 'rand' mode, which draws it normal; a per-image colour needs no per-pixel draws)."""
        n, _, h, w = img.shape
        on = d.uniform() < self.erase_prob
        area = (0.02 + (1 / 3 - 0.02) * d.uniform()) * h * w
        log_r = math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * d.uniform()
        bh = torch.sqrt(area * log_r.exp()).clamp(max=h)
        bw = torch.sqrt(area / log_r.exp()).clamp(max=w)
        top, left = d.uniform() * (h - bh), d.uniform() * (w - bw)
        colour = d.uniform(3) * 4 - 2
        rows = torch.arange(h, device=img.device).view(1, h, 1)
        cols = torch.arange(w, device=img.device).view(1, 1, w)
        box = ((rows >= top.view(n, 1, 1)) & (rows < (top + bh).view(n, 1, 1)) &
               (cols >= left.view(n, 1, 1)) & (cols < (left + bw).view(n, 1, 1)) & on.view(n, 1, 1))
        return torch.where(box[:, None], colour.view(n, 3, 1, 1).to(img.dtype), img)

    def _translate(self, d: Draws, theta: Tensor, side: int) -> Tensor:
        """Whole-pixel shifts of up to pad_frac * side: at the native size the view is an exact
        crop of the mirror-padded image."""
        pad = int(round(self.pad_frac * side))
        shift = d.randint(-pad, pad + 1, 2).float()
        theta = theta.clone()
        theta[:, :, 2] += shift * (2 / side)
        return theta

    def _flip(self, d: Draws, theta: Tensor) -> Tensor:
        flip = torch.where(d.uniform() < 0.5, -1.0, 1.0)  # drawn either way: later draws keep their places
        if not self.hflip:
            return theta
        theta = theta.clone()
        theta[:, :, 0] *= flip[:, None]  # mirror the output's x axis
        return theta

    def _resample(self, img: Tensor, theta: Tensor) -> Tensor:
        grid = F.affine_grid(theta, [len(img), 3, self.out_size, self.out_size], align_corners=False)
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _cutout(self, d: Draws, img: Tensor) -> Tensor:
        """A square of side cutout_frac * S at a random centre (clipped) set to grey."""
        n, _, h, w = img.shape
        side = self.cutout_frac * min(h, w)
        if side <= 0:
            return img
        cy = d.uniform() * h
        cx = d.uniform() * w
        rows = torch.arange(h, device=img.device).view(1, h, 1) + 0.5
        cols = torch.arange(w, device=img.device).view(1, 1, w) + 0.5
        inside = ((rows - cy.view(n, 1, 1)).abs() < side / 2) & ((cols - cx.view(n, 1, 1)).abs() < side / 2)
        return torch.where(inside[:, None], torch.full_like(img, 0.5), img)

    def _normalise(self, img: Tensor) -> Tensor:
        return (img - self.mean) / self.std


def _pixels(x: Images | Tensor) -> Tensor:
    return x.x if isinstance(x, Images) else x


def _to_float(x: Tensor) -> Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return x.permute(0, 3, 1, 2).float().div_(255)


def _identity(n: int, dev) -> Tensor:
    return torch.eye(2, 3, device=dev).repeat(n, 1, 1)


def _geometric(op: Tensor, signed: Tensor) -> Tensor:
    """(n, 3, 3) homogeneous affine matrices of the geometric ops (identity where op is colour)."""
    n, dev = len(op), op.device
    m = torch.eye(3, device=dev).repeat(n, 1, 1)
    angle = signed * MAX_ROTATE
    rot = op == GEOMETRIC_OPS.index("rotate")
    m[:, 0, 0] = torch.where(rot, angle.cos(), m[:, 0, 0])
    m[:, 0, 1] = torch.where(rot, -angle.sin(), m[:, 0, 1])
    m[:, 1, 0] = torch.where(rot, angle.sin(), m[:, 1, 0])
    m[:, 1, 1] = torch.where(rot, angle.cos(), m[:, 1, 1])
    m[:, 0, 1] = torch.where(op == GEOMETRIC_OPS.index("shear_x"), signed * MAX_SHEAR, m[:, 0, 1])
    m[:, 1, 0] = torch.where(op == GEOMETRIC_OPS.index("shear_y"), signed * MAX_SHEAR, m[:, 1, 0])
    m[:, 0, 2] = torch.where(op == GEOMETRIC_OPS.index("translate_x"), signed * MAX_TRANSLATE * 2, m[:, 0, 2])
    m[:, 1, 2] = torch.where(op == GEOMETRIC_OPS.index("translate_y"), signed * MAX_TRANSLATE * 2, m[:, 1, 2])
    return m  # composed as theta @ m: the op acts in output coordinates first


def _grey(img: Tensor) -> Tensor:
    return (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])


def _colour(img: Tensor, op: Tensor, strength: Tensor, sign: Tensor) -> Tensor:
    """Apply colour op `op` (index into COLOUR_OPS; negative = a geometric op = no change) per
    sample. Every op is computed for the whole batch and selected: cheap at the native size."""
    n = len(img)
    s = strength.view(n, 1, 1, 1)
    factor = 1 + (sign * strength * MAX_ENHANCE).view(n, 1, 1, 1)
    grey = _grey(img)
    blurred = F.avg_pool2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    lo = img.amin(dim=(2, 3), keepdim=True)
    hi = img.amax(dim=(2, 3), keepdim=True)
    bits = (8 - (s * 4).round()).clamp(4, 8)
    step = 2 ** (8 - bits)
    candidates = {
        "brightness": img * factor,
        "contrast": (img - grey.mean(dim=(2, 3), keepdim=True)) * factor + grey.mean(dim=(2, 3), keepdim=True),
        "color": (img - grey) * factor + grey,
        "sharpness": (img - blurred) * factor + blurred,
        "posterize": torch.floor(img * 255 / step) * step / 255,
        "solarize": torch.where(img >= 1 - s, 1 - img, img),
        "autocontrast": torch.where(hi > lo, (img - lo) / (hi - lo).clamp(min=1e-6), img),
        "equalize": _equalize(img),
    }
    out = img
    for name, value in candidates.items():
        out = torch.where((op == COLOUR_OPS.index(name)).view(n, 1, 1, 1), value, out)
    return out.clamp(0, 1)


def _equalize(img: Tensor) -> Tensor:
    """Per-image, per-channel histogram equalisation via each pixel's rank (batched)."""
    n, c, h, w = img.shape
    flat = (img * 255).round().reshape(n * c, h * w)
    # the share of the image's pixels at or below each value = the equalised intensity
    counts = torch.zeros(n * c, 256, device=img.device).scatter_add_(1, flat.long(), torch.ones_like(flat))
    cdf = counts.cumsum(1) / (h * w)
    return cdf.gather(1, flat.long()).reshape(n, c, h, w)
