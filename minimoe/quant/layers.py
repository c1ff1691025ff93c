"""Quantized layers: `QuantLinear` replaces an nn.Linear, `QuantExperts` a MoE layer's GroupedExperts.

Each layer computes y = x W'^T with W' = dequantize(codes, scale, zero) (minimoe.quant.formats). Two ways:

    reference   dequantize W' to x's dtype, then F.linear: short, obviously right, and slow (it rebuilds W'
                every call). The oracle the tests hold the kernels to.
    kernel      torch's packed kernels, where this platform has them (`kernel_path` says which one runs):
                  4-bit  CPU   aten._weight_int4pack_mm_for_cpu on aten._convert_weight_to_int4pack_for_cpu
                         CUDA  aten._weight_int4pack_mm on aten._convert_weight_to_int4pack (sm80+; "tinygemm")
                  8-bit  CPU/CUDA aten._weight_int8pack_mm (per-channel; bf16 activations)
                  W8A8         torch._int_mm: int8 x int8 -> int32, exact integer accumulation
                Both weight-only kernels read bf16 activations (their fp32 variants are slower than fp32
                F.linear on this CPU), so the kernel path rounds x to bf16 first: relative error ~ 2^-9.

Activation quantization (activation_quant=True): each token's input row is rounded to int8 with its own
scale s_x = max|x| / 127 at run time ("dynamic per-token", as in LLM.int8(), Dettmers et al. 2022, and
SmoothQuant, Xiao et al. 2022, without their outlier handling). With 8-bit weights the product runs in
integers: y = s_x * s_w * (q_x q_w^T - z_w * sum(q_x)). With 4-bit weights no torch kernel multiplies int8 by
int4, so the rounded activations go through the 4-bit kernel: W4A8's numbers, W4A16's speed.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .formats import QuantizedWeight, Scheme, pad_to_groups, quantize_rtn, unpack_int4

KERNELS = ("auto", "reference")


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric int8: x [..., k] -> (q int8 [..., k], scale float32 [..., 1])."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether this torch build registers aten::`op` for the device's backend (CPU, CUDA, ...)."""
    return _has_kernel(op, device.type)


@functools.lru_cache(maxsize=None)
def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and hasattr(torch.ops.aten, op) and \
        torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)


def _int4_kernel_ok(device: torch.device, out_features: int, group_size: int) -> bool:
    """Whether torch's int4 kernel takes this layer (its checks: group 32-256, out_features % 16)."""
    if group_size not in (32, 64, 128, 256) or out_features % 16:
        return False
    if device.type == "cpu":
        return has_kernel("_weight_int4pack_mm_for_cpu", device)
    # tinygemm: Ampere or newer
    return has_kernel("_weight_int4pack_mm", device) and torch.cuda.get_device_capability(device)[0] >= 8


class QuantLinear(nn.Module):
    """y = x W'^T (+ bias) with W' [out, in] stored quantized. Buffers: codes, scale, zero (asymmetric)."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool = False,
                 name: str = "linear", kernel: str = "auto"):
        super().__init__()
        g = scheme.group(in_features, name)
        self.in_features, self.out_features, self.scheme, self.kernel = in_features, out_features, scheme, kernel
        self.group_size, n_groups = g, -(-in_features // g)
        width = in_features // 2 if scheme.bits == 4 else in_features
        dtype = torch.uint8 if scheme.bits == 4 else torch.int8
        self.register_buffer("codes", torch.zeros(out_features, width, dtype=dtype))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zero", None if scheme.symmetric else
                             torch.zeros(out_features, n_groups, dtype=torch.int8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._runs = {}  # (device, more than 16 rows) -> forward's function, packed weights bound (never saved)

    @property
    def kernel(self) -> str:
        """Which computation forward() may use: 'auto' (torch's packed kernel where there is one) or
        'reference'. Setting it drops the planned functions, so the next call re-plans."""
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if value not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {value!r}")
        self._kernel, self._runs = value, {}

    @classmethod
    def from_weight(cls, weight: torch.Tensor, scheme: Scheme, bias=None, name: str = "linear",
                    qweight: QuantizedWeight | None = None, kernel: str = "auto") -> "QuantLinear":
        """Quantize weight [out, in] with RTN (or take an already quantized `qweight`, e.g. from GPTQ)."""
        layer = cls(weight.shape[1], weight.shape[0], scheme, bias is not None, name, kernel)
        layer.load_quantized(qweight if qweight is not None else quantize_rtn(weight, scheme, name))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer.to(weight.device)

    def load_quantized(self, qw: QuantizedWeight) -> None:
        self.codes.copy_(qw.codes)
        self.scale.copy_(qw.scale)
        if self.zero is not None:
            self.zero.copy_(qw.zero)
        self._runs = {}

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scale, self.zero, self.scheme.bits, self.group_size,
                               self.in_features)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """W' [out, in] as floats."""
        return self.quantized_weight().dequantize(dtype)

    def _apply(self, fn, recurse=True):
        self._runs = {}  # moved or cast: the packed copies belong to the old device
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._runs = {}  # new codes: the packed copies are stale
        return super()._load_from_state_dict(*args, **kwargs)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        key = (x.device, x2.shape[0] > 16)
        run = self._runs.get(key)
        if run is None:  # once per device and batch regime: the checks of kernel_path, and the kernel's layout
            run = self._runs[key] = self._plan(x2)
        y = run(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _plan(self, x2: torch.Tensor):
        """The function forward() calls for inputs like x2, with the kernel's packed weights bound into it.
        Decided once: at batch 1 a layer's whole kernel takes tens of microseconds, so per-call Python
        (dictionary lookups, checks, attribute reads) is a visible share of the time."""
        path = "reference" if self.kernel == "reference" else self.kernel_path(x2)
        if path == "reference":
            return self.reference_forward
        if path == "_int_mm":
            return functools.partial(self._w8a8, self.codes.t().contiguous())
        if path == "_weight_int8pack_mm":
            return functools.partial(self._int8, self.scale[:, 0].to(torch.bfloat16))
        packed, scale_zero = self._pack_int4(x2.device)
        mm = (torch.ops.aten._weight_int4pack_mm_for_cpu if x2.device.type == "cpu"
              else torch.ops.aten._weight_int4pack_mm)
        return functools.partial(self._int4, mm, packed, scale_zero)

    def reference_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, in] -> [M, out] by dequantizing (and, with activation_quant, fake-quantizing x2)."""
        if self.scheme.activation_quant:
            q, s = quantize_activations(x2)
            x2 = (q.float() * s).to(x2.dtype)
        return F.linear(x2, self.dequantize(x2.dtype))

    def kernel_path(self, x2: torch.Tensor) -> str:
        """Which computation forward() runs for an input like x2: "reference" or the kernel's name."""
        dev = x2.device
        if self.scheme.bits == 8 and self.scheme.activation_quant:
            if self.group_size != self.in_features:
                return "reference"
            # CUDA's _int_mm needs more than 16 rows and multiples of 8
            cuda_ok = x2.shape[0] > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0
            ok = has_kernel("_int_mm", dev) and (dev.type == "cpu" or cuda_ok)
            return "_int_mm" if ok else "reference"
        if self.scheme.bits == 8:
            per_channel = self.group_size == self.in_features
            return "_weight_int8pack_mm" if per_channel and has_kernel("_weight_int8pack_mm", dev) else "reference"
        if _int4_kernel_ok(dev, self.out_features, self.group_size):
            return "_weight_int4pack_mm_for_cpu" if dev.type == "cpu" else "_weight_int4pack_mm"
        return "reference"

    def _int4(self, mm, packed, scale_zero, x2):
        if self.scheme.activation_quant:  # W4A8: round the activations, then the 4-bit kernel
            q, s = quantize_activations(x2)
            x2 = q.float() * s
        xb = pad_to_groups(x2.to(torch.bfloat16), self.group_size)  # a short last group: zero inputs
        return mm(xb, packed, self.group_size, scale_zero)

    def _pack_int4(self, dev):
        """Our (codes, scale, zero) -> the tinygemm layout: w = (u - 8) * s + m with u = q + 8, so m = -z * s."""
        q = pad_to_groups(unpack_int4(self.codes), self.group_size)       # [out, groups * g], padded with 0
        u = q.to(torch.int32) + 8                                          # 0..15
        s = self.scale.float()
        m = -self.zero.float() * s if self.zero is not None else torch.zeros_like(s)
        scale_zero = torch.stack([s, m], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [groups, out, 2]
        if dev.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(dev), 2)
        else:  # CUDA takes the codes pre-packed two per byte, the even index in the HIGH nibble
            u8 = u.to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack((u8[:, 0::2] << 4 | u8[:, 1::2]).to(dev), 2)
        return packed, scale_zero.to(dev)

    def _int8(self, scales_bf16, x2):
        xb = x2.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(xb, self.codes, scales_bf16)
        if self.zero is not None:  # x (q - z)^T s = x q^T s - sum(x) (z s)
            y = y - xb.float().sum(-1, keepdim=True) * (self.zero[:, 0].float() * self.scale[:, 0].float())
        return y

    def _w8a8(self, codes_t, x2):  # codes_t: the codes as [in, out], _int_mm's layout
        qx, sx = quantize_activations(x2)
        acc = torch._int_mm(qx, codes_t)  # [M, out] int32, exact
        if self.zero is not None:
            acc = acc - qx.sum(-1, keepdim=True, dtype=torch.int32) * self.zero[:, 0].to(torch.int32)
        return acc.float() * sx * self.scale[:, 0].float()

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in={self.in_features}, out={self.out_features}, int{s.bits}, group={self.group_size}, "
                f"{'sym' if s.symmetric else 'asym'}{', A8' if s.activation_quant else ''}, kernel={self.kernel}")


class QuantExperts(nn.Module):
    """A MoE layer's E SwiGLU experts with quantized weights: a drop-in for moe.GroupedExperts.

    Expert e: y = (silu(x Wg'^T) * (x Wu'^T)) Wd'^T, each projection a QuantLinear ([Wg | Wu] stacked as one
    [2 d_ff, d_model] layer, like GroupedExperts' w_gate_up[e]^T). Combine weights, when given, scale the
    d_ff-wide hidden activations before the down projection, as GroupedExperts does.
    """

    def __init__(self, n_experts: int, d_model: int, d_ff: int, scheme: Scheme, name: str = "experts",
                 kernel: str = "auto"):
        super().__init__()
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.gate_up = nn.ModuleList(QuantLinear(d_model, 2 * d_ff, scheme, name=f"{name}.gate_up.{e}",
                                                 kernel=kernel) for e in range(n_experts))
        self.down = nn.ModuleList(QuantLinear(d_ff, d_model, scheme, name=f"{name}.down.{e}", kernel=kernel)
                                  for e in range(n_experts))

    def forward(self, x_sorted: torch.Tensor, counts, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x_sorted: [M, d_model] grouped by expert; counts: [E] rows per expert -> [M, d_model]."""
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        if len(counts) != self.n_experts or sum(counts) != x_sorted.shape[0]:
            raise ValueError(f"counts must have {self.n_experts} entries summing to {x_sorted.shape[0]}, got {counts}")
        out = x_sorted.new_empty(x_sorted.shape[0], self.d_model)
        start = 0
        for e, n in enumerate(counts):
            if n:
                xe = x_sorted[start:start + n]
                gate, up = self.gate_up[e](xe).chunk(2, dim=-1)
                h = F.silu(gate) * up
                if weights is not None:
                    h = h * weights[start:start + n, None].to(h.dtype)
                out[start:start + n] = self.down[e](h)
            start += n
        return out

    # Float copies in GroupedExperts' layout, for code that reads the stacked weights (e.g.
    # MiniLM.num_active_parameters, moe.dense_reference). Not used by forward.
    @property
    def w_gate_up(self) -> torch.Tensor:
        return torch.stack([lin.dequantize().t() for lin in self.gate_up])   # [E, d_model, 2 d_ff]

    @property
    def w_down(self) -> torch.Tensor:
        return torch.stack([lin.dequantize().t() for lin in self.down])      # [E, d_ff, d_model]
