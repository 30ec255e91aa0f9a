"""Exponential moving average of a model's classifier: the evaluation model and Semi-ViT's teacher."""
from __future__ import annotations

import copy

import torch
from torch import nn

# The MAE branch (decoder, the latent's norm) only reconstructs: an average of it is never read.
RECONSTRUCTION_PARTS = ("decoder", "mae_norm")


def classifier_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` without its reconstruction parts (those attributes read None)."""
    skip = {id(m): None for name in RECONSTRUCTION_PARTS if (m := getattr(model, name, None)) is not None}
    return copy.deepcopy(model, memo=skip)


class EMA:
    """theta_ema <- d * theta_ema + (1 - d) * theta, over the classifier's parameters and floating
    buffers (the encoder and head; not the MAE branch)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = classifier_copy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._param_names = [n for n, _ in self.model.named_parameters()]
        self._buffer_names = [n for n, _ in self.model.named_buffers()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        torch._foreach_lerp_(list(self.model.parameters()), [params[n].detach() for n in self._param_names],
                             1.0 - self.decay)
        for b_ema, name in zip(self.model.buffers(), self._buffer_names):
            if b_ema.dtype.is_floating_point:
                b_ema.lerp_(buffers[name], 1.0 - self.decay)
            else:
                b_ema.copy_(buffers[name])

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        self.load_state_dict(model.state_dict())

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """The classifier's tensors of `state`, every one required (a state with an MAE branch,
        e.g. a model's or an older checkpoint's EMA, loads its classifier part)."""
        own = self.model.state_dict()
        self.model.load_state_dict({k: v for k, v in state.items() if k in own})
