"""Round-to-nearest (RTN) weight quantization and the storage format every quantized layer uses.

A weight W [out, in] is cut, along its input dimension, into groups of `group_size` consecutive weights
(group_size=None: one group per row, "per output channel"). Each group g gets a scale s_g and, for an
asymmetric scheme, an integer zero point z_g; each weight becomes a b-bit integer code q:

    symmetric    q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),          s = max|w| / (2^(b-1) - 1)
    asymmetric   u = clamp(round(w / s) + z, 0, 2^b - 1),                   s = (max w - min w) / (2^b - 1)
                 z = round(-min w / s)  (min w <= 0 <= max w, so 0.0 stays exactly representable)
    dequantized  w' = (q - z) * s       with q = u - 2^(b-1) and z stored shifted the same way (0 if symmetric)

Storage (what a checkpoint holds, and what `bits_per_weight` counts):
    codes   8-bit: int8 [..., out, in];  4-bit: uint8 [..., out, in / 2], two codes per byte, the even input
            index in the low nibble (stored as q + 8, i.e. 0..15)
    scale   fp16 [..., out, groups], groups = ceil(in / group_size); rounded to fp16 *before* the codes are
            chosen, so the stored scale is exactly the one the codes were rounded against
    zero    int8 [..., out, groups]   asymmetric only, shifted like q
Rows that group_size does not divide: the last group of each row is shorter (in % group_size weights), and a
row shorter than group_size is one group. This is the same as padding the row with zeros to a whole number of
groups, which changes no scale: max |w| ignores zeros, and the asymmetric range always includes 0. The codes
are stored for the real weights only; kernels that need whole groups get a zero-padded copy at run time.

Bits per weight = b + 16 / group_size (+ 8 / group_size with zero points): 4.125 for 4-bit, group 128, which
is 16 / 4.125 = 3.88x smaller than fp16. A 4-bit format could reach 16 / 4 = 4x against fp16 only by storing
no scales at all, and never more (chapter 5, "How small can four bits get?").

RTN is checked in tests/test_quant.py against torch's own fake_quantize_per_channel_affine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (4, 8)


@dataclass(frozen=True)
class Scheme:
    """How one weight is quantized.

    bits: 4 or 8. group_size: input features per scale; None = one scale per output channel (the whole row).
    symmetric: no zero point (codes centred on 0). activation_quant: also round each token's input to int8
    at run time (dynamic per-token, W8A8 with 8-bit weights). method: "rtn" (round to nearest) or "gptq".
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    activation_quant: bool = False
    method: str = "rtn"

    def __post_init__(self):
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r} (other widths have no packed storage or "
                             "kernel here; 16-bit is model.half())")
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size < 2):
            raise ValueError(f"group_size must be an integer >= 2 or None (one group per output channel), "
                             f"got {self.group_size!r}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method must be 'rtn' or 'gptq', got {self.method!r}")
        if not isinstance(self.symmetric, bool) or not isinstance(self.activation_quant, bool):
            raise ValueError("symmetric and activation_quant must be True or False")

    def group(self, in_features: int, name: str = "weight") -> int:
        """Input features per scale for a layer with `in_features` inputs: group_size, or the whole row when
        it is shorter (or group_size is None). ValueError when 4-bit codes cannot be packed two per byte."""
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"{name}: in_features must be a positive integer, got {in_features!r}")
        if self.bits == 4 and in_features % 2:
            raise ValueError(f"4-bit codes are packed two per byte: {name} needs an even number of input "
                             f"features, got {in_features}")
        return min(self.group_size or in_features, in_features)

    def bits_per_weight(self, in_features: int) -> float:
        """Stored bits per weight: the code, plus the fp16 scale and int8 zero point of each group."""
        n_groups = -(-in_features // self.group(in_features))
        return self.bits + n_groups * (16 + (0 if self.symmetric else 8)) / in_features


@dataclass
class QuantizedWeight:
    """The stored form of a quantized [..., out, in] weight (see the module docstring)."""

    codes: torch.Tensor            # int8 [..., out, in] (8-bit) or uint8 [..., out, in / 2] (4-bit, packed)
    scale: torch.Tensor            # fp16 [..., out, in / group]
    zero: torch.Tensor | None      # int8 [..., out, in / group], None when symmetric
    bits: int
    group_size: int                # input features per scale (= in when per channel)
    in_features: int

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """w' = (q - z) * s as a [..., out, in] float tensor: the readable reference every kernel must match."""
        q = unpack_int4(self.codes) if self.bits == 4 else self.codes
        q = pad_to_groups(q.to(dtype), self.group_size).unflatten(-1, (-1, self.group_size))  # [..., out, G, g]
        if self.zero is not None:
            q = q - self.zero.to(dtype)[..., None]
        return (q * self.scale.to(dtype)[..., None]).flatten(-2)[..., :self.in_features]


def pad_to_groups(t: torch.Tensor, group_size: int, value: float = 0) -> torch.Tensor:
    """Pad the last dimension of t with `value` to a multiple of group_size (no copy when it already is one)."""
    extra = -t.shape[-1] % group_size
    return torch.nn.functional.pad(t, (0, extra), value=value) if extra else t


def _qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (rounded to fp16, returned as float32) and shifted zero point of each row of w [..., g]."""
    qmin, qmax = _qrange(bits)
    w = w.float()
    if symmetric:
        scale = w.abs().amax(-1) / qmax
        zero = None
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
    # an all-zero group: any scale works; 1 avoids 0/0. fp16's smallest normal keeps tiny groups representable.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp(min=6.1e-5, max=65504)
    scale = scale.half().float()
    if not symmetric:
        zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)  # lo / scale + (z - qmin) = 0 -> code qmin
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Shifted integer codes q of w [..., g] given one scale and zero per row ([...]): float tensor of integers."""
    qmin, qmax = _qrange(bits)
    q = torch.round(w.float() / scale[..., None])
    if zero is not None:
        q = q + zero[..., None]
    return q.clamp(qmin, qmax)


def quantize_rtn(weight: torch.Tensor, scheme: Scheme, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest quantization of weight [..., out, in] (one scale per group of each row)."""
    in_features = weight.shape[-1]
    g = scheme.group(in_features, name)
    w = pad_to_groups(weight.detach().float(), g).unflatten(-1, (-1, g))  # [..., out, groups, g]
    scale, zero = group_params(w, scheme.bits, scheme.symmetric)
    q = quantize_codes(w, scale, zero, scheme.bits).flatten(-2)[..., :in_features]
    return pack(q, scale, zero, scheme.bits, g)


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
         group_size: int) -> QuantizedWeight:
    """Integer-valued codes [..., out, in], scales and zeros [..., out, groups] -> the stored format."""
    q = q.to(torch.int8)
    codes = pack_int4(q) if bits == 4 else q
    return QuantizedWeight(codes=codes.contiguous(), scale=scale.half().contiguous(),
                           zero=None if zero is None else zero.to(torch.int8).contiguous(),
                           bits=bits, group_size=group_size, in_features=q.shape[-1])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes [..., n] (int, in [-8, 7]) -> uint8 [..., n / 2]: code 2i in the low nibble of byte i."""
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even number of codes per row, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)                          # 0..15
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 [..., n / 2] -> int8 [..., n] in [-8, 7]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2).to(torch.int8) - 8
