"""What a run consumes, counted where it happens: encoder forward passes in image equivalents.

A hook before the encoder's blocks counts the tokens every forward pass carries, through the
online model and its EMA, with or without gradient, masked or not. Divided by the tokens of
a whole image it gives forward-pass images: a FixMatch step at mu 7 costs B + 14B, an MAE pass
at mask ratio 0.75 a quarter image (plus its prefix tokens). Only the training step counts
(evaluation does not), and only shapes are read: no device synchronisation.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class ForwardCounter:
    def __init__(self, *models: torch.nn.Module):
        self.images = 0.0
        self._active = False
        self.handles = []
        for model in models:
            per_image = model.num_patches + model.num_prefix_tokens
            hook = torch.compiler.disable(lambda module, args, per_image=per_image: self._count(args, per_image))
            self.handles.append(model.vit.blocks.register_forward_pre_hook(hook))

    def _count(self, args, per_image: int) -> None:
        if self._active:
            tokens = args[0].shape[0] * args[0].shape[1]
            self.images += tokens / per_image

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self._active = True
        try:
            yield
        finally:
            self._active = False
