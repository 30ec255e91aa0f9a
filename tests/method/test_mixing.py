"""Mixup / CutMix: mixed images and targets, the cutmix area correction, seeded parameters."""
import numpy as np
import torch

from bench.method.mixing import mix, one_hot_smooth, prob_pseudo_mix_lambda, sample_mix_params
from bench.data.randomness import StepRandom


def draws(n, seed=0):
    return StepRandom(seed).on(torch.zeros(n, 1))


def constant_images(n, size=10):
    return torch.stack([torch.full((3, size, size), float(i)) for i in range(n)])


def test_one_hot_smooth():
    t = one_hot_smooth(torch.tensor([2, 0]), 4, 0.2)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert torch.allclose(t[0], torch.tensor([0.05, 0.05, 0.85, 0.05]))


def test_mixup_is_a_convex_combination():
    x, y = constant_images(4), one_hot_smooth(torch.arange(4), 4)
    perm = torch.tensor([3, 2, 1, 0])
    lam = torch.tensor([0.7, 0.2, 1.0, 0.5])
    xm, tm, lam_eff = mix(x, y, lam, x[perm], y[perm], torch.zeros(4, dtype=torch.bool), draws(4))
    assert torch.equal(lam_eff, lam)
    for i in range(4):
        assert torch.allclose(xm[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]])
        assert torch.allclose(tm[i], lam[i] * y[i] + (1 - lam[i]) * y[perm[i]])


def test_cutmix_lambda_is_corrected_to_the_clipped_box_area():
    n = 200
    x, y = constant_images(n), one_hot_smooth(torch.arange(n) % 5, 5)
    g = torch.Generator().manual_seed(0)
    lam = torch.rand(n, generator=g)
    perm = torch.roll(torch.arange(n), 1)
    xm, tm, lam_eff = mix(x, y, lam, x[perm], y[perm], torch.ones(n, dtype=torch.bool), draws(n))
    own = (xm == x).all(dim=1).flatten(1).float().mean(1)
    assert torch.allclose(own, lam_eff)
    assert (lam_eff >= lam - 0.1).all()   # clipping only shrinks the box (up to pixel rounding)
    assert (lam_eff > lam + 0.05).any()                       # and some boxes were clipped
    assert torch.allclose(tm, lam_eff[:, None] * y + (1 - lam_eff[:, None]) * y[perm])


def test_mix_params_are_seeded_and_respect_the_mode():
    def draw(seed):
        return sample_mix_params(draws(8, seed), 0.8, 1.0, 0.5, np.random.default_rng(seed))
    a, b = draw(0), draw(0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert any(not torch.equal(u, v) for u, v in zip(a, draw(1)))
    lam, perm, cut = sample_mix_params(draws(8), 0.0, 1.0, 0.5, np.random.default_rng(0))
    assert cut.all() and sorted(perm.tolist()) == list(range(8)) and ((lam >= 0) & (lam <= 1)).all()
    _, _, cut = sample_mix_params(draws(8), 0.4, 0.0, 0.5, np.random.default_rng(0))
    assert not cut.any()
    # one lambda per batch; over many batches cutmix is chosen about half the time
    modes = [bool(sample_mix_params(draws(8), 0.8, 1.0, 0.5, np.random.default_rng(s))[2][0]) for s in range(400)]
    assert 0.4 < sum(modes) / len(modes) < 0.6


def test_prob_pseudo_mix_lambda_pairs_sum_to_one():
    conf = torch.tensor([0.9, 0.3, 0.5, 0.7])
    perm = torch.tensor([1, 0, 3, 2])
    lam = prob_pseudo_mix_lambda(conf, conf[perm])
    assert torch.allclose(lam + lam[perm], torch.ones(4))
    assert torch.allclose(lam[0], torch.tensor(0.75))


def test_partners_come_from_the_whole_set_by_position():
    from bench.data.batch import Images
    from bench.method.mixing import partners_of
    values = torch.arange(10.0) * 10
    perm = torch.tensor([3, 0, 1, 2, 9, 8, 7, 6, 5, 4])
    images = Images(torch.zeros(10, 1), torch.arange(10) + 32, 10, 42, start=32)  # unlabeled rows 32..41
    assert torch.equal(partners_of(values, perm, images), values[perm])
