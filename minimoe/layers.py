"""The small building blocks of a Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import NORM_ROUNDINGS


class RMSNorm(nn.Module):
    """x / rms(x) * weight   (Zhang & Sennrich, 2019). Checked against torch.nn.RMSNorm in the tests.

    The mean of squares is always taken in fp32 (in bf16 it loses too much precision). In a bf16 or fp16 model
    `rounding` says where the result meets the narrow dtype:
        "once"           normalise and multiply by the weight in fp32, round once (the default);
        "before_weight"  round the normalised x to the input dtype, then multiply by the weight in that dtype,
                         as transformers' Llama / Mixtral / Qwen3 / DeepSeek-V3 RMSNorm does, so that a model
                         converted from transformers rounds exactly like its source (ModelConfig.norm_rounding).
    In fp32 the two are the same function (up to the last fp32 bit).
    """

    ROUNDINGS = NORM_ROUNDINGS

    def __init__(self, dim: int, eps: float = 1e-5, rounding: str = "once"):
        super().__init__()
        self.eps = eps
        self.rounding = rounding
        self.weight = nn.Parameter(torch.ones(dim))

    @property
    def rounding(self) -> str:
        return self._rounding

    @rounding.setter
    def rounding(self, value: str) -> None:
        if value not in self.ROUNDINGS:
            raise ValueError(f"rounding must be one of {self.ROUNDINGS}, got {value!r}")
        self._rounding = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rounding == "once":
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        # transformers' formula, op for op: the same fp32 normalisation, then two roundings
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h.to(x.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, rounding={self._rounding!r}"


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al., 2021, RoFormer), in the "rotate half" layout Llama uses.

    Dimension i of a head is paired with dimension i + d/2 and the pair is rotated by the angle
    pos * theta^(-2i/d):   (x1, x2) -> (x1 cos - x2 sin,  x2 cos + x1 sin).
    cos/sin tables are precomputed for `max_seq_len` positions and sliced at run time.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [head_dim/2]
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)     # [T, head_dim/2]
        # buffers, not parameters: never trained, and not saved in checkpoints (persistent=False)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """x: [batch, seq, heads, head_dim] at positions start .. start+seq-1 -> same shape."""
        T = x.shape[1]
        cos = self.cos[start:start + T, None, :].to(x.dtype)  # [T, 1, head_dim/2], broadcast over heads
        sin = self.sin[start:start + T, None, :].to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _RotateHalf.apply(x, cos, sin)
        return _rotate(x, cos, sin)  # inference: skip the autograd.Function call overhead (~50 us a call)


class _RotateHalf(torch.autograd.Function):
    """The rotation above with its backward written out (the inverse rotation, by -angle).

    Same numbers as the textbook  x * cos + cat(-x2, x1) * sin  (checked in tests/test_layers.py), but each
    half is written in place into one output buffer: no cat, no negation, no temporaries for autograd to keep.
    On a CPU, where these element-wise passes cost as much as the matmuls around them, this is worth ~10%
    of a training step (chapter 1, "How close to the hardware?").
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def _rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)            # x2 cos + x1 sin
    return out


class SwiGLU(nn.Module):
    """down( silu(gate(x)) * up(x) )   (Shazeer, 2020, "GLU Variants Improve Transformer").

    gate and up are stored as one [2*d_ff, d_model] matrix: one large matmul is faster than two small ones.
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)
