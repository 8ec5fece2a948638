"""Exponential moving average (EMA) of a student network's weights: the Mean Teacher's teacher."""
from __future__ import annotations

import torch
from torch import nn

BUFFER_POLICIES = ("copy", "ema")


class EMA:
    """``theta_T <- d * theta_T + (1 - d) * theta_S`` after every optimizer step.

    Args:
        decay: the target decay ``d`` (0.99 in the Mean Teacher literature for segmentation).
        warmup: if True, use ``min(1 - 1 / (step + 1), decay)`` so that the teacher follows the
            rapidly changing student closely at the start (Tarvainen & Valpola's schedule).
        buffer_policy: what happens to buffers (e.g. BatchNorm running statistics):
            ``"copy"`` (default) copies them from the student, so the teacher normalises with statistics
            of the data the student actually sees; ``"ema"`` averages floating-point buffers like weights.
            Integer buffers (``num_batches_tracked``) are always copied. nnU-Net's default InstanceNorm
            networks have no buffers, so the policy only matters for BatchNorm architectures.
    """

    def __init__(self, decay: float = 0.99, warmup: bool = True, buffer_policy: str = "copy"):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if buffer_policy not in BUFFER_POLICIES:
            raise ValueError(f"buffer_policy must be one of {BUFFER_POLICIES}, got {buffer_policy!r}")
        self.decay = decay
        self.warmup = warmup
        self.buffer_policy = buffer_policy

    def decay_at(self, step: int) -> float:
        """Effective decay at 0-based optimizer step ``step``."""
        if not self.warmup:
            return self.decay
        return min(1.0 - 1.0 / (step + 1.0), self.decay)

    @torch.no_grad()
    def update(self, teacher: nn.Module, student: nn.Module, step: int) -> float:
        """Move ``teacher`` towards ``student`` in place; returns the decay used.

        Both modules must have identical parameter and buffer names (the teacher is a deepcopy of the
        unwrapped student, never a DDP or compiled wrapper).
        """
        d = self.decay_at(step)
        t_params = dict(teacher.named_parameters())
        for name, p in student.named_parameters():
            t_params[name].mul_(d).add_(p.detach().to(t_params[name].dtype), alpha=1.0 - d)
        t_bufs = dict(teacher.named_buffers())
        for name, b in student.named_buffers():
            tb = t_bufs[name]
            if self.buffer_policy == "ema" and tb.is_floating_point():
                tb.mul_(d).add_(b.detach().to(tb.dtype), alpha=1.0 - d)
            else:
                tb.copy_(b)
        return d
