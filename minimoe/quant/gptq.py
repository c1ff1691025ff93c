"""GPTQ: quantization that corrects its own rounding errors (Frantar et al., 2022, arXiv 2210.17323).

Round-to-nearest quantizes every weight on its own. GPTQ quantizes a layer's weight W [out, in] one input
column at a time and, after rounding column i, moves the rounding error onto the columns not yet quantized so
that the layer's *output* on calibration inputs X [n, in] changes as little as possible:

    minimise || X W^T - X W'^T ||^2     whose Hessian (per output row) is   H = 2 X^T X / n     [in, in]

For one column this is the Optimal Brain Surgeon update (Hassibi & Stork, 1993; OBQ, Frantar & Alistarh,
2022): with U the upper Cholesky factor of H^-1 (H^-1 = U^T U), rounding column i with error
e = (w_i - w'_i) / U_ii is compensated by  W[:, j] -= e * U_ij  for every later column j > i. GPTQ's two
speed-ups are kept: the fixed left-to-right column order (the same U serves every row), and lazy batches: a
block of B columns is updated column by column, the rest of the matrix once per block with one matmul.

Group-wise scales are chosen when the quantizer reaches a group's first column, from the weights as the
earlier error updates left them (so the scale fits what is actually rounded). H is damped by 1% of its mean
diagonal for a stable Cholesky. Inputs that were always zero on the calibration text ("dead" columns) get
H_ii = 1, so no error is pushed into them; unlike the paper's code their weights are kept (rounded), not zeroed,
because a feature silent on calibration text need not be silent on other text.
Written from the paper's Algorithm 1; tests/test_quant.py checks it beats RTN on the layer objective.
"""
from __future__ import annotations

import torch

from .formats import QuantizedWeight, Scheme, group_params, pack, quantize_codes


class Hessian:
    """Running H = 2 X^T X / n over every input row a layer saw: add(x [..., in]) per calibration batch."""

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.H += 2 * x.t() @ x
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return (self.H / max(self.n, 1)).float()


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, scheme: Scheme, name: str = "weight",
                  block_size: int = 128, damp: float = 0.01) -> QuantizedWeight:
    """GPTQ-quantize weight [out, in] for inputs whose Hessian is H [in, in] (see the module docstring)."""
    W = weight.detach().float().clone()
    out, n = W.shape
    g = scheme.group(n, name)
    if H.shape != (n, n):
        raise ValueError(f"{name}: Hessian of shape {tuple(H.shape)} does not match {n} input features")
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    n_groups = -(-n // g)
    Q = torch.zeros_like(W)
    scale = W.new_zeros(out, n_groups)
    zero = None if scheme.symmetric else W.new_zeros(out, n_groups)
    B = max(g, block_size // g * g)  # blocks hold whole groups, so a group's scale sees its current weights
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                s, z = group_params(W1[:, i:i + g], scheme.bits, scheme.symmetric)
                scale[:, col // g] = s
                if zero is not None:
                    zero[:, col // g] = z
            q = quantize_codes(W1[:, i:i + 1], s, z, scheme.bits)[:, 0]
            w_hat = (q - (z if z is not None else 0)) * s
            err = (W1[:, i] - w_hat) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]   # compensate in the columns still to come
            E1[:, i] = err
            Q[:, col] = q
        W[:, i2:] -= E1 @ U[i1:i2, i2:]                      # the lazy update of everything after the block
    return pack(Q, scale, zero, scheme.bits, g)


def layer_error(weight: torch.Tensor, qweight: QuantizedWeight, H: torch.Tensor) -> float:
    """The objective GPTQ minimises: trace(D H D^T) / 2 with D = W - W', i.e. the mean over calibration inputs x
    of the squared output error ||(W - W') x||^2."""
    D = weight.detach().float() - qweight.dequantize()
    return float(torch.einsum("oi,ij,oj->", D, H.float(), D)) / 2
