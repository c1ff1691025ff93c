"""The grouped SwiGLU experts as one hand-written autograd function: fewer, larger kernels than autograd's.

E experts, expert e owns the contiguous block of counts[e] rows of x (rows sorted by expert):

    gu_e = x_e @ Wgu_e                  [n_e, 2f]   (gate | up)
    h_e  = silu(gate_e) * up_e          [n_e, f]
    y_e  = h_e @ Wd_e                   [n_e, d]

Letting autograd record this loop costs, per expert, a dozen small kernels and as many temporary tensors,
then a `cat` of the E outputs and, in the backward, a `cat` of the E gate/up gradients and a `stack` of the E
weight gradients. Here every matmul writes straight into its slice of one preallocated buffer (`mm(out=)`),
the elementwise SwiGLU runs once over all M rows instead of once per expert, and the weight gradients are
written in place into one stacked [E, ...] buffer:

    forward:   E x mm -> gu [M, 2f];  h = silu(gate) * up once;  E x mm -> y [M, d]
    backward:  E x (dh_e = dy_e @ Wd_e^T,  dWd_e = h_e^T @ dy_e)
               dgate = silu'(gate) * dh * up,  dup = dh * silu(gate)   once, into one buffer dgu [M, 2f]
               E x (dWgu_e = x_e^T @ dgu_e,  dx_e = dgu_e @ Wgu_e^T)

The forward keeps x, the weights, gu and h (what autograd would keep, less silu(gate), recomputed in the
backward). The values are those of the plain loop: the same matmuls on the same blocks, and the elementwise
formulas autograd uses for silu and the product. An expert that received no token gets a zero weight
gradient. Double backward is not supported (once_differentiable).

Optionally the function also applies the router's combine weights, one per row: y = w * expert(x). It scales
h [M, f] before the down projection instead of y [M, d] after it (equal up to rounding), so the weights'
gradient is a row-wise dot product over f, not over d:  dw = rowsum(dh_w * h),  dh = w * dh_w,  where
dh_w = dy @ Wd^T. For fine-grained experts (f < d) that moves less memory than weighting the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _blocks(counts: tuple[int, ...]):
    """(expert, first row, last row + 1) for every expert that received at least one row."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class GroupedSwiGLUFunction(torch.autograd.Function):
    """y = the E SwiGLU experts applied to their blocks of x (times row_weights if not None); see the module
    docstring for the algebra."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                row_weights: torch.Tensor | None, counts: tuple[int, ...]):
        M, f = x.shape[0], w_down.shape[1]
        gu = x.new_empty(M, 2 * f)
        for e, a, b in _blocks(counts):
            torch.mm(x[a:b], w_gate_up[e], out=gu[a:b])
        h = F.silu(gu[:, :f]).mul_(gu[:, f:])
        h_in = h if row_weights is None else h * row_weights[:, None]  # what the down projection reads
        y = x.new_empty(M, w_down.shape[2])
        for e, a, b in _blocks(counts):
            torch.mm(h_in[a:b], w_down[e], out=y[a:b])
        ctx.counts = counts
        ctx.save_for_backward(x, w_gate_up, w_down, row_weights, gu, h, h_in)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, w_gate_up, w_down, row_weights, gu, h, h_in = ctx.saved_tensors
        need_x, need_wgu, need_wd, need_rw = ctx.needs_input_grad[:4]
        counts, f = ctx.counts, w_down.shape[1]
        dy = dy.contiguous()
        dx = dw_gate_up = dw_down = d_row_weights = None

        dh = h.new_empty(h.shape)  # first the gradient of h_in, then, weighted, of h
        if need_wd:
            dw_down = _zeros_for_idle(w_down, counts)
        for e, a, b in _blocks(counts):
            torch.mm(dy[a:b], w_down[e].t(), out=dh[a:b])
            if need_wd:
                torch.mm(h_in[a:b].t(), dy[a:b], out=dw_down[e])
        if row_weights is not None:
            if need_rw:
                d_row_weights = torch.linalg.vecdot(dh, h)
            dh.mul_(row_weights[:, None])

        if need_x or need_wgu:
            gate, up = gu[:, :f], gu[:, f:]
            dgu = gu.new_empty(gu.shape)
            # d(silu(g) * u): du = dh * silu(g);  dg = silu'(g) * dh * u  (aten's silu_backward formula)
            torch.mul(dh, F.silu(gate), out=dgu[:, f:])
            torch.ops.aten.silu_backward.grad_input(dh.mul_(up), gate, grad_input=dgu[:, :f])
            if need_x:
                dx = x.new_empty(x.shape)
            if need_wgu:
                dw_gate_up = _zeros_for_idle(w_gate_up, counts)
            for e, a, b in _blocks(counts):
                if need_wgu:
                    torch.mm(x[a:b].t(), dgu[a:b], out=dw_gate_up[e])
                if need_x:
                    torch.mm(dgu[a:b], w_gate_up[e].t(), out=dx[a:b])
        return dx, dw_gate_up, dw_down, d_row_weights, None


def _zeros_for_idle(w: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised gradient buffer like w [E, ...] whose slices for experts with no rows are zero."""
    g = torch.empty_like(w, memory_format=torch.contiguous_format)
    for e, n in enumerate(counts):
        if not n:
            g[e].zero_()
    return g


def grouped_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts,
                   row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """E SwiGLU experts on the expert-sorted rows of x: x [M, d], w_gate_up [E, d, 2f], w_down [E, f, d] -> [M, d].

    counts: E python ints summing to M. row_weights: optional [M], multiplies each row's result (the router's
    combine weights, sorted like x). Under autocast the inputs are cast once to the autocast dtype (what
    autocast would do to every per-expert matmul) and the experts run in that dtype; row_weights always
    follow x's dtype.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, w_gate_up, w_down = x.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
    if not x.dtype == w_gate_up.dtype == w_down.dtype:
        raise ValueError(f"x, w_gate_up and w_down must share a dtype, got {x.dtype}, {w_gate_up.dtype} and "
                         f"{w_down.dtype}")
    if row_weights is not None:
        if row_weights.shape != x.shape[:1]:
            raise ValueError(f"row_weights must have shape [{x.shape[0]}] (one per row of x), got "
                             f"{tuple(row_weights.shape)}")
        row_weights = row_weights.to(x.dtype).contiguous()
    return GroupedSwiGLUFunction.apply(x.contiguous(), w_gate_up.contiguous(), w_down.contiguous(), row_weights,
                                       tuple(int(n) for n in counts))


def grouped_mm_available(x: torch.Tensor) -> bool:
    """True where `grouped_swiglu_mm` runs: bf16 on a CUDA GPU of compute capability 9.0 or newer (Hopper),
    the case torch._grouped_mm's fused kernels (and their backward) cover."""
    return (x.is_cuda and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def grouped_swiglu_mm(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor,
                      row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """What `grouped_swiglu` computes, with each projection of all E experts as ONE grouped matmul kernel.

    On a GPU the per-expert loop is launch-bound (two matmuls per expert, a host sync for the block sizes);
    torch._grouped_mm takes the blocks' end offsets as a device tensor instead, so the layer runs as a handful
    of kernels whatever E is, and autograd differentiates it. counts: [E] tensor on x's device. bf16 only.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_gate_up, w_down = x.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
    offs = torch.cumsum(counts.to(x.device), 0, dtype=torch.int32)
    f = w_down.shape[1]
    gu = torch._grouped_mm(x, w_gate_up, offs=offs)
    h = F.silu(gu[:, :f]) * gu[:, f:]
    if row_weights is not None:
        h = h * row_weights[:, None].to(h.dtype)
    return torch._grouped_mm(h, w_down, offs=offs)
