"""Every random number of a training step derives from (seed, step).

At the start of step t the engine reseeds one device generator and one host generator from
(seed, t): a resumed run draws exactly what an uninterrupted one draws, with no generator state
in the checkpoint. The images of a step are its *rows* (labeled rows first, then unlabeled);
every per-image draw is made for all rows of the step and gathered by the rows at hand, so an
image's augmentation, mask and mixing partner depend on its row, never on which other images
share its tensor. That is what keeps a run the same when its batch is split across ranks
(`bench.data.batch.Images.rows`).

Per-batch scalars (a mixup lambda, the mixup-or-cutmix choice) come from the host generator:
no device synchronisation. Stochastic depth and dropout inside the encoder use torch's global
generator, reseeded from (seed, t) and the rank; their draws follow the tensor they act on, so
they are the one draw that depends on the world size.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

from bench.data.batch import Images


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for (seed, *parts): independent streams for every (purpose, step)."""
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


class StepRandom:
    """The run's random source, reseeded at every step from (seed, step)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", rank: int = 0):
        self.seed, self.rank = int(seed), int(rank)
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(derive_seed(self.seed, "device", "init"))
        self.host = np.random.default_rng(derive_seed(self.seed, "host", "init"))
        torch.manual_seed(derive_seed(self.seed, "init"))  # the model's initial weights

    def begin(self, step: int) -> None:
        """Reseed every generator for optimizer step `step` (0-based)."""
        self.generator.manual_seed(derive_seed(self.seed, "device", step))
        self.host = np.random.default_rng(derive_seed(self.seed, "host", step))
        # stochastic depth and dropout act on this rank's images: their stream is the rank's own
        torch.manual_seed(derive_seed(self.seed, "model", step, *((self.rank,) if self.rank else ())))

    def on(self, images: Images | Tensor) -> "Draws":
        """Per-image draws for `images` (a bare tensor counts as rows 0..n-1 of its own step)."""
        return Draws(self, images if isinstance(images, Images) else Images.whole(images))


class Draws:
    """Random numbers for one set of images: drawn for every row of the step, gathered by row."""

    def __init__(self, random: StepRandom, images: Images):
        self.random, self.images = random, images
        self.n = len(images)

    def _gather(self, values: Tensor) -> Tensor:
        return values[self.images.rows.to(values.device)]

    def uniform(self, *shape: int) -> Tensor:
        """U[0, 1) of shape (n, *shape)."""
        r = self.random
        return self._gather(torch.rand((self.images.universe, *shape), generator=r.generator, device=r.device))

    def randint(self, low: int, high: int, *shape: int) -> Tensor:
        """Integers in [low, high) of shape (n, *shape)."""
        r = self.random
        return self._gather(torch.randint(low, high, (self.images.universe, *shape), generator=r.generator,
                                          device=r.device))

    def partners(self) -> Tensor:
        """A random partner for every image of the set (a permutation over the whole set), as
        positions into these images: mixup, cutmix and pseudo-mixup pair images with it."""
        r = self.random
        return torch.randperm(self.images.size, generator=r.generator, device=r.device)
