"""Device views: shapes, ranges, seeded determinism, and that crops really are crops."""
import numpy as np
import pytest
import torch

from bench.data.batch import Images
from bench.data.randomness import StepRandom
from bench.method.views import IMAGENET_MEAN, IMAGENET_STD, Views

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def views(size=16, seed=0, **kw):
    return Views(size, StepRandom(seed), **kw)


def pixels(v):
    """Undo the normalisation: back to [0, 1] pixels."""
    return v * STD + MEAN


def images(n=8, size=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", ["eval", "weak", "strong", "mae"])
@pytest.mark.parametrize("out", [16, 32])
def test_shapes_ranges_and_seeded_determinism(kind, out):
    x = images()
    a = views(out).labeled(x, kind)
    b = views(out).labeled(x, kind)
    assert a.shape == (8, 3, out, out) and a.dtype == torch.float32
    assert torch.equal(a, b)                                 # same seed, same views
    p = pixels(a)
    assert p.min() >= -1e-5 and p.max() <= 1 + 1e-5
    if kind != "eval":
        assert not torch.equal(a, views(out, seed=1).labeled(x, kind))  # another seed differs


def test_eval_view_is_the_normalised_image():
    x = images()
    expected = x.permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(pixels(views().eval(x)), expected, atol=1e-5)


def test_weak_view_is_a_crop_of_the_mirror_padded_image():
    x = images(n=6, size=12)
    pad = 2
    out = pixels(views(12, pad_frac=pad / 12).weak(x)).permute(0, 2, 3, 1).numpy()
    padded = np.pad(x.numpy().astype(np.float32) / 255, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    for i in range(len(x)):
        found = False
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[i, dy:dy + 12, dx:dx + 12]
                for candidate in (crop, crop[:, ::-1]):
                    found |= np.allclose(out[i], candidate, atol=1e-4)
        assert found, f"sample {i} is not a shifted (and maybe flipped) crop"


def test_mae_view_crops_the_configured_area():
    ramp = torch.arange(32, dtype=torch.float32).mul(255 / 31).round().to(torch.uint8)
    x = ramp.view(1, 1, 32, 1).expand(64, 32, 32, 3).contiguous()  # pixel value encodes the column
    p = pixels(views(32, mae_scale=(0.25, 0.25)).mae(x))[:, 0]
    span = (p.amax(dim=(1, 2)) - p.amin(dim=(1, 2)))          # width of the crop, as a share of the image
    lo, hi = (0.25 * 3 / 4) ** 0.5, (0.25 * 4 / 3) ** 0.5
    assert (span > lo - 0.08).all() and (span < hi + 0.02).all()
    full = pixels(views(32, mae_scale=(1.0, 1.0)).mae(x))[:, 0]
    assert (full.amax(dim=(1, 2)) - full.amin(dim=(1, 2)) > 0.85).all()


def test_strong_view_cuts_out_a_grey_square_and_changes_colours():
    x = torch.zeros(16, 16, 16, 3, dtype=torch.uint8)
    p = pixels(views(16, randaug_ops=0, cutout_frac=0.5).strong(x))
    grey = (p - 0.5).abs().lt(1e-4).all(dim=1)                # (B, S, S): pixels set to grey
    assert (grey.flatten(1).sum(1) >= 4 * 4).all()           # at least a quarter of the 8x8 square
    assert (grey.flatten(1).sum(1) <= 8 * 8).all()
    y = images(n=64)
    weak = pixels(views(16, pad_frac=0).weak(y))
    strong = pixels(views(16, pad_frac=0, cutout_frac=0, randaug_ops=2).strong(y))
    assert (weak - strong).abs().mean() > 0.02               # RandAugment changed the images


def test_views_are_a_function_of_seed_and_step():
    x = images()
    v = views()
    v.random.begin(7)
    first = v.strong(x)
    v.random.begin(8)
    assert not torch.equal(v.strong(x), first)               # the next step draws afresh
    v.random.begin(7)
    assert torch.equal(v.strong(x), first)                   # step 7 again: the same views
    other = views(seed=1)
    other.random.begin(7)
    assert not torch.equal(other.strong(x), first)          # another seed, another stream


def test_an_images_view_depends_on_its_row_not_on_its_batch_mates():
    """Row r of a step gets the same augmentation whether it is viewed with the whole step or
    alone: the property that lets ranks split a batch and still train on the same pixels."""
    x = images(8)
    whole = Images.whole(x)
    for kind in ("weak", "strong", "mae"):
        v = views()
        v.random.begin(3)
        together = v.labeled(whole, kind)
        v.random.begin(3)
        part = Images(x[5:], whole.rows[5:], whole.size, whole.universe)
        assert torch.equal(v.labeled(part, kind), together[5:]), kind


def test_224px_views_random_resized_crop_jitter_erasing_and_centre_crop():
    x = torch.from_numpy(np.tile(np.arange(64, dtype=np.uint8)[None, :, None, None] * 4, (8, 1, 64, 3)))  # rows of values
    plain, rrc = views(32), views(32, crop="rrc", crop_scale_min=0.25)
    assert not torch.equal(plain.weak(x), rrc.weak(x))
    # a crop keeps at least crop_scale_min of the area: the rows it spans cover >= half the image
    spans = [pixels(v)[:, 0].amax() - pixels(v)[:, 0].amin() for v in rrc.weak(x)]
    assert min(float(s) for s in spans) >= 0.4 * (252 / 255)
    jittered = views(32, jitter=0.4).weak(images())
    assert not torch.allclose(jittered, views(32).weak(images()))        # colours move, geometry does not
    erased = views(32, erase_prob=1.0, cutout_frac=0.0).strong(images())
    kept = views(32, erase_prob=0.0, cutout_frac=0.0).strong(images())
    assert ((erased != kept).flatten(1).any(1)).all()                  # every image got its box
    # evaluation: resize to 32 / 0.875 = 37, then the centre 32 x 32
    img = images(2, size=37)
    centre = views(32, eval_crop=0.875).eval(img)
    torch.testing.assert_close(pixels(centre), img.permute(0, 3, 1, 2).float()[:, :, 2:34, 2:34] / 255)
