"""The hand-written grouped SwiGLU (minimoe/grouped_experts.py) against the plain autograd loop it replaces."""
from __future__ import annotations

import pytest
import torch

from minimoe.grouped_experts import GroupedSwiGLUFunction, grouped_swiglu
from minimoe.moe import DeepSeekRouter, GroupedExperts, MoE, SoftmaxTopKRouter


def run(fn, ge: GroupedExperts, x: torch.Tensor, counts, dy: torch.Tensor | None = None):
    """Output and the gradients of x, w_gate_up and w_down of fn(x, counts) after backward(dy)."""
    ge.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, counts)
    y.backward(torch.ones_like(y) if dy is None else dy)
    return [y.detach(), x.grad, ge.w_gate_up.grad, ge.w_down.grad]


def assert_all_close(got, expected, **tol):
    for name, a, b in zip(("y", "dx", "dw_gate_up", "dw_down"), got, expected):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)


COUNTS = [
    [5, 0, 7, 1, 0, 3],       # idle experts in the middle and at the end
    [0, 0, 16, 0, 0, 0],      # every row to one expert
    [0, 4, 4, 4, 4, 0],       # idle first and last
    [3, 1, 2, 5, 1, 4],       # nobody idle
]


@pytest.mark.parametrize("counts", COUNTS)
def test_equals_loop_fp32(counts):
    torch.manual_seed(0)
    ge = GroupedExperts(6, 16, 12)
    x = torch.randn(sum(counts), 16)
    dy = torch.randn(sum(counts), 16)
    got = run(ge.forward, ge, x, counts, dy)
    expected = run(ge.loop_forward, ge, x, counts, dy)
    assert_all_close(got, expected, rtol=1e-5, atol=1e-5)
    for e, n in enumerate(counts):
        if n == 0:  # an idle expert's weights get an exact zero gradient, not garbage from an empty buffer
            assert got[2][e].abs().max() == 0 and got[3][e].abs().max() == 0


def test_equals_loop_bf16():
    torch.manual_seed(1)
    counts = [40, 0, 25, 63]
    ge = GroupedExperts(4, 64, 48).to(torch.bfloat16)
    x = torch.randn(sum(counts), 64, dtype=torch.bfloat16)
    dy = torch.randn(sum(counts), 64, dtype=torch.bfloat16)
    got = run(ge.forward, ge, x, counts, dy)
    expected = run(ge.loop_forward, ge, x, counts, dy)
    assert all(t.dtype == torch.bfloat16 for t in got)
    assert_all_close(got, expected, rtol=2e-2, atol=2e-2)


def test_gradcheck_float64():
    torch.manual_seed(2)
    counts = (2, 0, 3)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w_gate_up = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    row_weights = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: GroupedSwiGLUFunction.apply(a, b, c, None, counts),
                                    (x, w_gate_up, w_down))
    assert torch.autograd.gradcheck(lambda a, b, c, w: GroupedSwiGLUFunction.apply(a, b, c, w, counts),
                                    (x, w_gate_up, w_down, row_weights))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_row_weights_equal_weighting_the_output(dtype, tol):
    """forward(x, counts, weights) = weights * forward(x, counts), gradients of the weights included."""
    torch.manual_seed(7)
    counts = [9, 0, 4, 11]
    ge = GroupedExperts(4, 32, 24).to(dtype)
    x = torch.randn(sum(counts), 32, dtype=dtype)
    w = torch.rand(sum(counts))  # fp32 like a router's weights; cast to x's dtype inside
    dy = torch.randn(sum(counts), 32, dtype=dtype)

    def grads(fn):
        wi = w.clone().requires_grad_(True)
        return run(lambda a, c: fn(a, c, wi), ge, x, counts, dy) + [wi.grad]

    fast, loop = grads(ge.forward), grads(ge.loop_forward)
    assert fast[0].dtype == dtype
    assert_all_close(fast[:4], loop[:4], rtol=tol, atol=tol)
    torch.testing.assert_close(fast[4], loop[4], rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="row_weights"):
        ge(x, counts, w[:-1])


def test_counts_as_tensor_and_non_contiguous_gradient():
    torch.manual_seed(3)
    counts = [3, 0, 5]
    ge = GroupedExperts(3, 8, 6)
    x = torch.randn(8, 8)
    # y.sum().backward() hands the backward an expanded (stride-0) gradient
    fast = run(lambda a, c: ge(a, torch.tensor(c)).sum()[None], ge, x, counts)
    loop = run(lambda a, c: ge.loop_forward(a, c).sum()[None], ge, x, counts)
    assert_all_close(fast, loop, rtol=1e-5, atol=1e-5)


def test_no_rows_at_all():
    ge = GroupedExperts(3, 8, 6)
    x = torch.randn(0, 8, requires_grad=True)
    y = ge(x, [0, 0, 0])
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    assert ge.w_gate_up.grad.abs().max() == 0 and ge.w_down.grad.abs().max() == 0


def test_only_some_inputs_need_gradients():
    torch.manual_seed(4)
    counts = [2, 3]
    ge = GroupedExperts(2, 8, 4)
    ge.w_down.requires_grad_(False)
    x = torch.randn(5, 8)  # no gradient for the input either
    ge(x, counts).sum().backward()
    expected = ge.w_gate_up.grad.clone()
    ge.w_gate_up.grad = None
    ge.loop_forward(x, counts).sum().backward()
    torch.testing.assert_close(expected, ge.w_gate_up.grad)
    assert ge.w_down.grad is None


@pytest.mark.parametrize("counts", [[6, 4, 6], [6, 0, 10]])
def test_autocast_matches_the_loop_under_autocast(counts):
    torch.manual_seed(5)
    ge = GroupedExperts(3, 32, 16)
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ge(x, counts)
        y_loop = ge.loop_forward(x, counts)
    # the experts run in bf16 either way; the loop's cat turns its output back into fp32 when an idle expert
    # contributes its empty fp32 slice of x, the fast path always returns the autocast dtype
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_loop.to(y.dtype), rtol=0, atol=0)
    y.float().sum().backward()
    assert ge.w_gate_up.grad.dtype == torch.float32  # gradients reach the fp32 master weights


def test_mixed_dtypes_are_refused():
    ge = GroupedExperts(2, 8, 4)
    with pytest.raises(ValueError, match="dtype"):
        grouped_swiglu(torch.randn(3, 8, dtype=torch.float64), ge.w_gate_up, ge.w_down, [1, 2])


def test_double_backward_is_refused():
    ge = GroupedExperts(2, 8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    (g,) = torch.autograd.grad(ge(x, [1, 2]).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("router", ["softmax", "deepseek"])
def test_moe_layer_unchanged(router, monkeypatch):
    """The whole layer (router, dispatch, experts, combine, shared experts) gives the same values and gradients
    with the fast path as with the loop."""
    torch.manual_seed(6)
    d, E = 16, 8
    r = SoftmaxTopKRouter(d, E, 2) if router == "softmax" else DeepSeekRouter(d, E, 3)
    moe = MoE(d, 12, r, E, n_shared_experts=1 if router == "deepseek" else 0)
    x = torch.randn(2, 10, d)

    def grads():
        moe.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = moe(xi)
        y = y[0] if isinstance(y, tuple) else y
        y.pow(2).sum().backward()
        return [y.detach(), xi.grad] + [p.grad for p in moe.parameters()]

    fast = grads()
    monkeypatch.setattr(GroupedExperts, "forward", GroupedExperts.loop_forward)
    loop = grads()
    for a, b in zip(fast, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _grouped_case(device, dtype, E=6, d=64, f=32, counts=(5, 0, 9, 3, 0, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    M = sum(counts)
    x = torch.randn(M, d, generator=g).to(device, dtype)
    w_gu = (torch.randn(E, d, 2 * f, generator=g) / d ** 0.5).to(device, dtype)
    w_d = (torch.randn(E, f, d, generator=g) / f ** 0.5).to(device, dtype)
    w = torch.rand(M, generator=g).to(device, dtype)
    return x, w_gu, w_d, torch.tensor(counts, device=device), w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_forward_matches_the_hand_written_function(dtype):
    """torch._grouped_mm's forward also runs on a CPU, so the one-kernel path's arithmetic is checked here too."""
    from minimoe.grouped_experts import grouped_swiglu_mm
    x, w_gu, w_d, counts, w = _grouped_case("cpu", dtype)
    with torch.no_grad():
        ours = grouped_swiglu_mm(x, w_gu, w_d, counts, w)
        ref = grouped_swiglu(x, w_gu, w_d, counts.tolist(), w)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(ours.float(), ref.float(), **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_grouped_mm_path_on_cuda_matches_the_loop_forward_and_backward():
    from minimoe.grouped_experts import grouped_mm_available, grouped_swiglu_mm
    x, w_gu, w_d, counts, w = _grouped_case("cuda", torch.bfloat16)
    if not grouped_mm_available(x):
        pytest.skip("torch._grouped_mm needs a Hopper (sm90+) GPU")
    grads = []
    for fn in (lambda *a: grouped_swiglu_mm(*a, counts, w), lambda *a: grouped_swiglu(*a, counts.tolist(), w)):
        leaves = [t.clone().requires_grad_() for t in (x, w_gu, w_d)]
        y = fn(*leaves)
        y.float().pow(2).sum().backward()
        grads.append([y.detach().float()] + [t.grad.float() for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
