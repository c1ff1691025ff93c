"""The article's DynamicMoE listing, made runnable: it runs, and it has exactly the defects chapter 1 shows."""
import pytest
import torch

from minimoe.article import (FIXES, ArticleDynamicMoE, article_capacity, capacity_mask, count_expert_rows,
                             expert_flops, swiglu_flops_per_row, token_capacity)
from minimoe.moe import MoE, SoftmaxTopKRouter, dispatch


def _article(d=16, E=8, k=2, cf=1.2, d_ff=12, seed=0):
    torch.manual_seed(seed)
    return ArticleDynamicMoE(d, num_experts=E, capacity_factor=cf, k=k, d_ff=d_ff)


def test_it_runs_and_every_fix_is_documented():
    layer = _article(d=64, E=8)   # capacity int(1.2 * 8) = 9
    x = torch.randn(20, 64)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert y.abs().sum() > 0, "the implemented mask keeps something, so the output is not all zeros"
    assert len(FIXES) >= 5 and all(f.problem and f.effect and f.change for f in FIXES)
    assert layer.k == 2 and layer.capacity == 9


def test_rejects_inputs_the_listing_cannot_index():
    with pytest.raises(ValueError, match="N, d_model"):
        _article()(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="k=9"):
        ArticleDynamicMoE(16, num_experts=8, k=9)


def test_output_is_the_masked_plain_sum_of_the_chosen_experts():
    layer = _article(d=16, E=4, cf=2.0)  # capacity int(2 * 16 / 4) = 8
    x = torch.randn(10, 16)
    y = layer(x)
    every = torch.stack([e(x) for e in layer.experts])  # [E, N, d]
    sel, mask = layer.last_selected, layer.last_mask
    expect = sum(every[sel[:, i], torch.arange(10)] * mask[:, i, None] for i in range(layer.k))
    torch.testing.assert_close(y, expect)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}, "a 0/1 mask, never a routing weight"


def test_mask_keeps_the_first_capacity_assignments_in_token_order():
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    mask = capacity_mask(idx, 3, capacity=2)
    # expert 0 is chosen by tokens 0, 1, 2, 3: only tokens 0 and 1 keep it
    assert mask.tolist() == [[True, True], [True, True], [True, False], [False, False]]
    assert capacity_mask(idx, 3, None).all()


def _dispatch_kept(idx, n_experts, capacity):
    plan = dispatch(idx, n_experts, capacity)
    kept = torch.zeros(idx.numel(), dtype=torch.bool)
    kept[plan.order] = True
    return kept.view_as(idx)


def test_mask_is_the_literal_token_order_rule_not_gshards_slot_priority():
    # with k = 1 there is one slot, and the two rules agree
    idx = torch.tensor([[0], [1], [0], [0], [1]])
    assert torch.equal(capacity_mask(idx, 2, 2), _dispatch_kept(idx, 2, 2))
    # token 0 picks (1, 0), token 1 picks (0, 2); one place per expert. In token order token 0's second
    # choice takes expert 0's place; minimoe's dispatch (GShard) serves token 1's first choice instead.
    idx = torch.tensor([[1, 0], [0, 2]])
    assert capacity_mask(idx, 3, 1).tolist() == [[True, True], [False, True]]
    assert _dispatch_kept(idx, 3, 1).tolist() == [[True, False], [True, True]]
    # which assignments are dropped differs; how many each expert drops does not
    torch.manual_seed(0)
    idx = torch.rand(64, 8).argsort(-1)[:, :2]
    for rule in (capacity_mask(idx, 8, 10), _dispatch_kept(idx, 8, 10)):
        assert torch.equal(torch.zeros(8).index_add_(0, idx.flatten(), rule.flatten().float()),
                           torch.bincount(idx.flatten(), minlength=8).clamp(max=10).float())


def test_capacity_depends_on_d_model_not_on_tokens():
    assert article_capacity(512, 64, 1.2) == 9  # int(1.2 * 8)
    torch.manual_seed(0)
    layer = ArticleDynamicMoE(512, num_experts=64, capacity_factor=1.2, d_ff=4)
    assert layer.capacity == 9
    for n in (16, 256, 2048):
        layer(torch.randn(n, 512))
        per_expert = torch.zeros(64).index_add_(0, layer.last_selected.reshape(-1), layer.last_mask.reshape(-1))
        assert per_expert.max() <= 9
        if n == 2048:  # 4096 assignments, at most 64 * 9 = 576 kept
            assert layer.last_mask.mean() <= 576 / 4096
    # token-based capacity grows with the batch, the article's does not
    assert [token_capacity(n, 64, 1.2, 2) for n in (16, 256, 2048)] == [1, 10, 77]
    # a model narrower than num_experts / capacity_factor gets capacity 0: the layer outputs only zeros
    narrow = ArticleDynamicMoE(32, num_experts=64, d_ff=4)
    assert narrow.capacity == 0 and narrow(torch.randn(5, 32)).abs().max() == 0


def test_routing_weights_do_not_affect_the_output():
    layer = _article(d=16, E=8, cf=4.0)
    x = torch.randn(12, 16)
    y1, w1, s1 = layer(x), layer.last_routing_weights, layer.last_selected
    with torch.no_grad():  # sharper logits: same order, so same top-k, but different routing weights
        layer.gate.weight.mul_(5.0)
        layer.gate.bias.mul_(5.0)
    y2, w2, s2 = layer(x), layer.last_routing_weights, layer.last_selected
    assert torch.equal(s1, s2)
    assert (w1 - w2).abs().max() > 0.05
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_gate_gets_no_gradient_but_a_sparse_moe_gate_does():
    layer = _article(d=16, E=8, cf=4.0)
    layer(torch.randn(12, 16)).square().sum().backward()
    assert layer.gate.weight.grad is None or layer.gate.weight.grad.abs().max() == 0
    assert all(p.grad is not None for p in layer.experts.parameters())

    torch.manual_seed(0)
    moe = MoE(16, 12, SoftmaxTopKRouter(16, 8, 2), 8)
    moe(torch.randn(1, 12, 16)).square().sum().backward()
    assert moe.router.gate.weight.grad.abs().max() > 0


@pytest.mark.parametrize("E", [4, 16, 32])
def test_cost_grows_with_experts_for_the_article_and_with_k_for_moe(E):
    N, d, d_ff, k = 24, 16, 8, 2
    torch.manual_seed(0)
    layer = ArticleDynamicMoE(d, num_experts=E, capacity_factor=1.2, k=k, d_ff=d_ff)
    moe = MoE(d, d_ff, SoftmaxTopKRouter(d, E, k), E)   # dropless
    x = torch.randn(N, d)
    assert count_expert_rows(layer, x) == N * E
    assert count_expert_rows(moe, x[None]) == N * k
    flops = expert_flops(N, d, d_ff, E, k)
    per_row = swiglu_flops_per_row(d, d_ff)
    assert flops == {"article": N * E * per_row, "sparse": N * k * per_row}


def test_count_expert_rows_rejects_other_modules():
    with pytest.raises(TypeError):
        count_expert_rows(torch.nn.Linear(2, 2), torch.randn(1, 2))
