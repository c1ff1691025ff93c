import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe.layers import SwiGLU
from minimoe.moe import (DeepSeekRouter, GroupedExperts, HashRouter, MoE, RouterOutput, SoftmaxTopKRouter,
                         TaskRouter, dense_reference, pooled_balance_loss, router_z_loss, sequence_balance_loss,
                         switch_balance_loss)

VOCAB = 50


class FixedRouter(nn.Module):
    """Routes token n to experts[n] with weights[n]: lets a test pick the exact assignment."""

    def __init__(self, n_experts, experts, weights):
        super().__init__()
        self.n_experts, self.experts, self.weights = n_experts, experts, weights

    def forward(self, x, token_ids=None, task_ids=None):
        N = x.shape[0]
        scores = torch.zeros(N, self.n_experts).scatter_(1, self.experts, self.weights)
        return RouterOutput(self.weights, self.experts, scores, torch.zeros_like(scores))


def _build(draw_kind, d, E, k, data):
    if draw_kind == "softmax":
        return SoftmaxTopKRouter(d, E, k, norm_topk_prob=data.draw(st.booleans()))
    if draw_kind == "deepseek":
        n_group = data.draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0]))
        per = E // n_group
        topk_group = data.draw(st.integers(-(-k // per), n_group))
        r = DeepSeekRouter(d, E, k, n_group, topk_group, routed_scaling_factor=data.draw(st.sampled_from([1.0, 2.5])))
        r.bias.copy_(torch.randn(E) * 0.3)  # a non-zero bias, so choice and weights disagree
        return r
    if draw_kind == "hash":
        return HashRouter(E, k, VOCAB, seed=data.draw(st.integers(0, 3)))
    n_tasks = data.draw(st.integers(1, E // k))
    return TaskRouter(d, E, k, n_tasks)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["softmax", "deepseek", "hash", "task"]),
       d=st.integers(8, 16), E=st.integers(2, 8), B=st.integers(1, 4), T=st.integers(1, 10),
       shared=st.integers(0, 2), cap=st.one_of(st.none(), st.floats(0.25, 2.0)), seed=st.integers(0, 2**16))
def test_moe_equals_dense_reference_in_value_and_gradient(data, kind, d, E, B, T, shared, cap, seed):
    torch.manual_seed(seed)
    k = data.draw(st.integers(1, E))
    router = _build(kind, d, E, k, data)
    moe = MoE(d, 6, router, E, n_shared_experts=shared, capacity_factor=cap)
    x = torch.randn(B, T, d)
    tok = torch.randint(0, VOCAB, (B, T))
    task = torch.randint(0, getattr(router, "n_tasks", 1), (B,))

    def run(fn):
        moe.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = fn(moe, xg, tok, task)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # a non-symmetric upstream grad
        return y.detach(), xg.grad, {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}

    y, gx, gp = run(lambda m, *a: m(*a))
    y_ref, gx_ref, gp_ref = run(dense_reference)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    assert gp.keys() == gp_ref.keys() and "experts.w_gate_up" in gp
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_dense_reference_is_not_trivially_equal():
    """Guard against an oracle that shares the bug: dropping, weights and the shared path all change y."""
    torch.manual_seed(0)
    moe = MoE(8, 6, SoftmaxTopKRouter(8, 4, 2), 4, n_shared_experts=1, capacity_factor=0.5)
    x = torch.randn(2, 6, 8)
    y = moe(x)
    stats = moe.stats()
    assert stats["dropped_fraction"] > 0
    moe.capacity_factor = None
    assert not torch.allclose(moe(x), y)
    torch.testing.assert_close(moe(x), dense_reference(moe, x))


# ---- dispatch and capacity -----------------------------------------------------------------------

def test_dropless_never_drops():
    torch.manual_seed(0)
    moe = MoE(8, 6, SoftmaxTopKRouter(8, 4, 2), 4)
    with torch.no_grad():
        moe.router.gate.weight[0] += 5.0  # skew the routing hard towards one expert
    moe(torch.randn(3, 7, 8))
    stats = moe.stats()
    assert stats["dropped_fraction"] == 0.0
    assert sum(stats["tokens_per_expert"]) == 3 * 7 * 2


def test_capacity_drops_late_tokens_in_token_order():
    N, E, k = 8, 4, 1
    router = FixedRouter(E, torch.zeros(N, k, dtype=torch.long), torch.ones(N, k))  # everyone wants expert 0
    moe = MoE(8, 6, router, E, capacity_factor=1.0)  # capacity = ceil(1.0 * 8 * 1 / 4) = 2
    assert moe.capacity(N * k) == 2
    x = torch.randn(1, N, 8)
    y = moe(x)
    stats = moe.stats()
    assert stats["tokens_per_expert"] == [8, 0, 0, 0]  # counted before dropping
    assert stats["dropped_fraction"] == pytest.approx(6 / 8)
    assert stats["max_vio"] == pytest.approx(3.0)  # (8 - 2) / 2
    y = y[0]
    assert (y[:2].abs().sum(-1) > 0).all()  # the first two tokens in batch order are served
    assert (y[2:] == 0).all()  # the rest contribute nothing
    torch.testing.assert_close(y, dense_reference(moe, x)[0])


def test_capacity_is_per_expert_with_two_slots():
    # token n picks experts (n % 2, 2 + n % 2): each expert gets 3 of 6 tokens; capacity 2 drops the third
    N, E = 6, 4
    experts = torch.stack([torch.arange(N) % 2, 2 + torch.arange(N) % 2], dim=1)
    router = FixedRouter(E, experts, torch.full((N, 2), 0.5))
    moe = MoE(8, 6, router, E, capacity_factor=2 / 3)  # ceil(2/3 * 12 / 4) = 2
    x = torch.randn(1, N, 8)
    y = moe(x)
    stats = moe.stats()
    assert stats["dropped_fraction"] == pytest.approx(4 / 12)
    assert (y[0, 4:] == 0).all() and (y[0, :4].abs().sum(-1) > 0).all()


# ---- grouped experts -----------------------------------------------------------------------------

def test_grouped_experts_equal_separate_swiglus():
    torch.manual_seed(0)
    E, d, f = 3, 8, 5
    ge = GroupedExperts(E, d, f)
    mlps = [SwiGLU(d, f) for _ in range(E)]
    with torch.no_grad():
        for e, m in enumerate(mlps):
            m.gate_up.weight.copy_(ge.w_gate_up[e].T)
            m.down.weight.copy_(ge.w_down[e].T)
    counts = [4, 0, 3]
    x = torch.randn(sum(counts), d)
    expected = torch.cat([m(xe) for m, xe in zip(mlps, x.split(counts))])
    torch.testing.assert_close(ge(x, counts), expected)
    torch.testing.assert_close(ge(x, torch.tensor(counts)), expected)
    with pytest.raises(ValueError, match="counts"):
        ge(x, [1, 1, 1])


# ---- DeepSeek router -----------------------------------------------------------------------------

def test_deepseek_bias_changes_choice_not_weights():
    torch.manual_seed(0)
    r = DeepSeekRouter(8, 6, 2, routed_scaling_factor=2.5)
    r.bias.copy_(torch.randn(6) * 0.1)  # non-zero everywhere, so a bias leaking into the weights would show
    x = torch.randn(40, 8)
    before = r(x)
    torch.testing.assert_close(before.weights.sum(-1), torch.full((40,), 2.5))
    r.bias[int(before.experts[0, 0])] = -10.0  # forbid token 0's first choice
    after = r(x)
    assert not torch.equal(before.experts, after.experts)
    same = (before.experts == after.experts).all(-1)
    assert same.any() and not same.all()
    torch.testing.assert_close(after.weights[same], before.weights[same], atol=0, rtol=0)
    torch.testing.assert_close(after.weights.sum(-1), torch.full((40,), 2.5))
    # the weights are the normalised sigmoid affinities of the chosen experts, bias-free
    s = torch.sigmoid(r.gate(x))
    chosen = s.gather(1, after.experts)
    torch.testing.assert_close(after.weights, chosen / chosen.sum(-1, keepdim=True) * 2.5)


def test_deepseek_group_limited_routing():
    torch.manual_seed(0)
    E, n_group, topk_group = 8, 4, 2
    r = DeepSeekRouter(8, E, 3, n_group=n_group, topk_group=topk_group)
    r.bias.copy_(torch.randn(E))
    x = torch.randn(40, 8)
    out = r(x)
    groups = out.experts // (E // n_group)
    assert all(len(set(g.tolist())) <= topk_group for g in groups)
    # and they are the groups with the best sum of top-2 biased scores
    biased = (torch.sigmoid(r.gate(x)) + r.bias).view(40, n_group, 2)
    best = biased.topk(2, -1).values.sum(-1).topk(topk_group, -1).indices
    for g, b in zip(groups, best):
        assert set(g.tolist()) <= set(b.tolist())


def test_deepseek_update_bias_and_buffer():
    r = DeepSeekRouter(8, 4, 1)
    r.update_bias(torch.tensor([10, 2, 4, 4]), gamma=0.01)  # mean 5: overloaded, under, under, under
    torch.testing.assert_close(r.bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    r.update_bias([5, 5, 5, 5], gamma=0.01)  # balanced: sign(0) = 0, no move
    torch.testing.assert_close(r.bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert "bias" in r.state_dict() and "bias" not in dict(r.named_parameters())
    assert not r.bias.requires_grad
    r(torch.randn(5, 8)).weights.sum().backward()
    assert r.bias.grad is None and r.gate.weight.grad is not None


def test_moe_records_load_for_bias_update():
    torch.manual_seed(0)
    moe = MoE(8, 6, DeepSeekRouter(8, 4, 2), 4)
    moe(torch.randn(2, 5, 8))
    stats = moe.stats()
    assert moe.last_tokens_per_expert.tolist() == stats["tokens_per_expert"]
    moe.router.update_bias(moe.last_tokens_per_expert, 1e-3)
    assert (moe.router.bias.abs() <= 1e-3).all() and moe.router.bias.abs().sum() > 0


# ---- hash and task routers -----------------------------------------------------------------------

def test_hash_router_is_a_fixed_even_map():
    E, k = 4, 2
    r = HashRouter(E, k, vocab_size=400, seed=1)
    ids = torch.arange(400)
    out = r(torch.zeros(400, 8), ids)
    again = r(torch.zeros(400, 8), ids.flip(0))
    assert torch.equal(out.experts, again.experts.flip(0))
    assert torch.equal(HashRouter(E, k, 400, seed=1).table, r.table)  # rebuilt from the seed
    assert (out.experts[:, 0] != out.experts[:, 1]).all()
    torch.testing.assert_close(out.weights, torch.full((400, k), 0.5))
    load = torch.bincount(out.experts.flatten(), minlength=E)
    assert load.min() >= 0.9 * load.float().mean()
    with pytest.raises(ValueError, match="token_ids"):
        r(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="token_ids"):
        r(torch.zeros(1, 8), torch.tensor([400]))


def test_task_router_stays_in_the_task_subset():
    torch.manual_seed(0)
    subsets = [[0, 1, 5], [2, 3], [4, 6, 7]]
    r = TaskRouter(8, 8, 2, 3, task_experts=subsets)
    tasks = torch.arange(60) % 3
    out = r(torch.randn(60, 8), task_ids=tasks)
    for t, ex, s in zip(tasks, out.experts, out.scores):
        assert set(ex.tolist()) <= set(subsets[t])
        outside = [e for e in range(8) if e not in subsets[t]]
        assert (s[outside] == 0).all()
    default = TaskRouter(8, 6, 1, 3)  # blocks {0,1}, {2,3}, {4,5}
    ex = default(torch.randn(6, 8), task_ids=torch.tensor([0, 1, 2, 0, 1, 2])).experts[:, 0]
    assert (ex // 2 == torch.tensor([0, 1, 2, 0, 1, 2])).all()
    for bad in (torch.tensor([3]), torch.tensor([-1])):
        with pytest.raises(ValueError, match="task_ids"):
            r(torch.randn(1, 8), task_ids=bad)
    with pytest.raises(ValueError, match="task_ids"):
        r(torch.randn(1, 8))


def test_moe_task_ids_per_sequence():
    torch.manual_seed(0)
    moe = MoE(8, 6, TaskRouter(8, 4, 1, 2), 4)
    x = torch.randn(2, 3, 8)
    moe(x, task_ids=torch.tensor([0, 1]))
    ex = moe.last_router_output.experts.view(2, 3)
    assert (ex[0] < 2).all() and (ex[1] >= 2).all()


# ---- losses and stats ----------------------------------------------------------------------------

def test_switch_balance_loss():
    E, N = 4, 8
    uniform_scores = torch.full((N, E), 1 / E)
    balanced = (torch.arange(N) % E)[:, None]
    assert switch_balance_loss(uniform_scores, balanced, E).item() == pytest.approx(1.0)
    skewed_scores = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(N, E)
    skewed = torch.zeros(N, 1, dtype=torch.long)
    assert switch_balance_loss(skewed_scores, skewed, E).item() == pytest.approx(4 * 0.7)
    logits = torch.randn(N, E, requires_grad=True)
    scores = logits.softmax(-1)
    loss = switch_balance_loss(scores, scores.topk(1).indices, E)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_pooled_balance_loss():
    """transformers' load_balancing_loss_func: f and P pooled over the layers, f summing to k."""
    E, N, k = 4, 8, 2
    uniform = torch.full((N, E), 1 / E)
    balanced = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], dim=1)
    assert pooled_balance_loss([uniform, uniform], [balanced, balanced], E).item() == pytest.approx(k)
    torch.manual_seed(0)
    logits = torch.randn(3, N, E, requires_grad=True)
    scores = list(logits.softmax(-1).unbind(0))
    experts = [s.detach().topk(k).indices for s in scores]
    one = pooled_balance_loss(scores[:1], experts[:1], E)
    assert one.item() == pytest.approx(k * switch_balance_loss(scores[0], experts[0], E).item(), rel=1e-6)
    loss = pooled_balance_loss(scores, experts, E)
    f = sum(torch.bincount(e.reshape(-1), minlength=E) for e in experts).float() / (3 * N)
    p = sum(s.detach().sum(0) for s in scores) / (3 * N)
    assert loss.item() == pytest.approx(E * float((f * p).sum()), rel=1e-6)
    per_layer = sum(switch_balance_loss(s, e, E) for s, e in zip(scores, experts))
    assert loss.item() != pytest.approx(per_layer.item(), rel=1e-3)  # a product of pooled means, not a sum
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one tensor per MoE layer"):
        pooled_balance_loss(scores, experts[:2], E)
    with pytest.raises(ValueError, match="one tensor per MoE layer"):
        pooled_balance_loss([], [], E)


def test_router_z_loss_matches_formula():
    logits = torch.randn(5, 4)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 5
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)


def test_sequence_balance_loss():
    torch.manual_seed(0)
    B, T, E, k = 2, 4, 4, 1
    # perfectly balanced per sequence: each expert once, uniform affinities -> 1
    experts = (torch.arange(B * T) % E)[:, None]
    assert sequence_balance_loss(torch.full((B * T, E), 0.3), experts, E, B, T).item() == pytest.approx(1.0)
    # against a literal loop over eq. 17-20
    logits = torch.randn(B * T, E, requires_grad=True)
    s = logits.sigmoid()
    experts = (s.detach() + torch.randn(E)).topk(2).indices
    loss = sequence_balance_loss(s, experts, E, B, T)
    ref = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        for i in range(E):
            f = E / (2 * T) * sum(int(i in experts[t].tolist()) for t in rows)
            p = sum(float(s[t, i].detach() / s[t].sum().detach()) for t in rows) / T
            ref += f * p / B
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert loss.item() >= 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="batch"):
        sequence_balance_loss(s, experts, E, 3, T)


def test_stats_max_vio_and_entropy():
    N, E = 8, 4
    balanced = FixedRouter(E, (torch.arange(N) % E)[:, None], torch.ones(N, 1))
    moe = MoE(8, 6, balanced, E)
    moe(torch.randn(1, N, 8))
    stats = moe.stats()
    assert stats["max_vio"] == 0.0 and stats["tokens_per_expert"] == [2, 2, 2, 2]
    assert stats["router_entropy"] == pytest.approx(0.0, abs=1e-6)  # one-hot scores
    skew = FixedRouter(E, torch.tensor([0, 0, 0, 0, 0, 1, 2, 3])[:, None], torch.ones(N, 1))
    moe = MoE(8, 6, skew, E)
    moe(torch.randn(1, N, 8))
    stats = moe.stats()
    assert stats["max_vio"] == pytest.approx((5 - 2) / 2)
    moe = MoE(8, 6, SoftmaxTopKRouter(8, E, 1), E)
    nn.init.zeros_(moe.router.gate.weight)  # uniform scores: entropy log E
    moe(torch.randn(1, N, 8))
    stats = moe.stats()
    assert stats["router_entropy"] == pytest.approx(math.log(E), rel=1e-5)
    assert all(isinstance(v, float) for k, v in stats.items() if k != "tokens_per_expert")


# ---- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("build, field", [
    (lambda: SoftmaxTopKRouter(8, 4, 5), "top_k"),
    (lambda: SoftmaxTopKRouter(8, 0, 1), "n_experts"),
    (lambda: SoftmaxTopKRouter(0, 4, 1), "d_model"),
    (lambda: SoftmaxTopKRouter(8, 4, 0), "top_k"),
    (lambda: DeepSeekRouter(8, 6, 2, n_group=4), "n_group"),
    (lambda: DeepSeekRouter(8, 8, 2, n_group=2, topk_group=3), "topk_group"),
    (lambda: DeepSeekRouter(8, 8, 3, n_group=4, topk_group=1), "top_k"),
    (lambda: HashRouter(4, 1, 0), "vocab_size"),
    (lambda: TaskRouter(8, 4, 2, 3), "n_tasks"),
    (lambda: TaskRouter(8, 4, 1, 2, task_experts=[[0], [9]]), "task_experts"),
    (lambda: GroupedExperts(4, 8, 0), "d_ff"),
    (lambda: MoE(8, 6, SoftmaxTopKRouter(8, 4, 1), 4, capacity_factor=0), "capacity_factor"),
    (lambda: MoE(8, 6, SoftmaxTopKRouter(8, 4, 1), 4, capacity_factor=-1.0), "capacity_factor"),
    (lambda: MoE(8, 6, SoftmaxTopKRouter(8, 4, 1), 4, n_shared_experts=-1), "n_shared_experts"),
    (lambda: MoE(8, 6, SoftmaxTopKRouter(8, 4, 1), 5), "n_experts"),
    (lambda: MoE(8, 0, SoftmaxTopKRouter(8, 4, 1), 4), "d_ff"),
    (lambda: SoftmaxTopKRouter(8, 4, 1, precision="bf16"), "precision"),
    (lambda: DeepSeekRouter(8, 4, 1, precision=None), "precision"),
    (lambda: TaskRouter(8, 4, 1, 2, precision="float32"), "precision"),
])
def test_bad_arguments_raise_naming_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_moe_needs_ids_its_router_needs():
    moe = MoE(8, 6, HashRouter(4, 1, VOCAB), 4)
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(1, 3, 8))
    moe = MoE(8, 6, TaskRouter(8, 4, 1, 2), 4)
    with pytest.raises(ValueError, match="task_ids"):
        moe(torch.randn(2, 3, 8), task_ids=torch.tensor([0, 2]))


def test_deepseek_router_without_normalisation_scales_raw_scores():
    torch.manual_seed(0)
    r = DeepSeekRouter(8, 6, 2, routed_scaling_factor=2.5, norm_topk_prob=False)
    out = r(torch.randn(5, 8))
    torch.testing.assert_close(out.weights, 2.5 * out.scores.gather(1, out.experts))


def test_input_precision_router_computes_logits_like_transformers_mixtral():
    """precision="input": the logits of a bf16 input are a bf16 matmul (transformers' Mixtral / Qwen3-MoE),
    from the fp32 gate weight cast to the input's dtype; the weight itself stays fp32."""
    torch.manual_seed(0)
    r = SoftmaxTopKRouter(16, 8, 2, precision="input").to(torch.bfloat16)
    assert r.gate.weight.dtype == torch.float32
    x = torch.randn(32, 16).bfloat16()
    out = r(x)
    assert torch.equal(out.logits, torch.nn.functional.linear(x, r.gate.weight.bfloat16()).float())
    fp32 = SoftmaxTopKRouter(16, 8, 2)
    fp32.load_state_dict(r.state_dict())
    assert not torch.equal(fp32(x).logits, out.logits)  # the default computes in fp32


def test_a_quantized_gate_is_left_as_it_is():
    """minimoe.quant may replace a router's gate (policy "router"): the router calls it in its own precision and
    leaves its tensors to the cast, exactly as the same layer outside a router."""
    from minimoe.quant.formats import Scheme
    from minimoe.quant.layers import QuantLinear

    torch.manual_seed(0)
    r = DeepSeekRouter(32, 8, 2)
    alone = QuantLinear.from_weight(r.gate.weight.detach(), Scheme(8, None))
    r.gate = QuantLinear.from_weight(r.gate.weight.detach(), Scheme(8, None))
    r.to(torch.bfloat16)
    alone.to(torch.bfloat16)
    for (name, a), b in zip(r.gate.named_buffers(), alone.buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert r.bias.dtype == torch.float32  # the router's own bias still stays fp32
    x = torch.randn(16, 32).bfloat16()
    torch.testing.assert_close(r(x).logits, alone(x).float(), rtol=0, atol=0)
