"""Expert capacity: GShard's slot priority, capacity in training only, and task extraction that keeps capacity.

The oracle for which assignments survive is the rule as GShard (Lepikhin et al., 2020) and Switch (Fedus et
al., 2021) state it, written as plain loops: every token's first choice is served, in token order, before any
token's second choice, and so on. It shares no code with `minimoe.moe.dispatch` or `dense_reference`.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minimoe import ModelConfig
from minimoe.checkpoint import load_checkpoint, save_checkpoint
from minimoe.model import MiniLM
from minimoe.moe import MoE, RouterOutput, SoftmaxTopKRouter, dense_reference, dispatch
from minimoe.train import evaluate


def gshard_kept(experts: list[list[int]], n_experts: int, capacity: int | None) -> list[list[bool]]:
    """Which (token, slot) assignments an expert computes: slot 0 of every token in token order, then slot 1..."""
    k = len(experts[0]) if experts else 0
    used = [0] * n_experts
    kept = [[False] * k for _ in experts]
    for slot in range(k):
        for n, choice in enumerate(experts):
            e = choice[slot]
            if capacity is None or used[e] < capacity:
                kept[n][slot] = True
                used[e] += 1
    return kept


class FixedRouter(nn.Module):
    """Routes token n to experts[n] with weights[n]."""

    def __init__(self, n_experts, experts, weights):
        super().__init__()
        self.n_experts, self.experts, self.weights = n_experts, experts, weights

    def forward(self, x, token_ids=None, task_ids=None):
        scores = torch.zeros(x.shape[0], self.n_experts).scatter_(1, self.experts, self.weights)
        return RouterOutput(self.weights, self.experts, scores, torch.zeros_like(scores))


def oracle_output(moe: MoE, x: torch.Tensor, kept: list[list[bool]]) -> torch.Tensor:
    """y[n] = sum over the kept (n, slot) of weight * expert(x[n]), one token and one expert at a time."""
    flat = x.reshape(-1, x.shape[-1])
    r = moe.router(flat)
    y = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for slot in range(r.experts.shape[1]):
            if kept[n][slot]:
                e = int(r.experts[n, slot])
                gate, up = (flat[n] @ moe.experts.w_gate_up[e]).chunk(2)
                y[n] += r.weights[n, slot] * ((F.silu(gate) * up) @ moe.experts.w_down[e])
    return y.view_as(x)


def _random_choices(N, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, E, generator=g).argsort(-1)[:, :k]  # k distinct experts per token


# ---- which assignments are kept ------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(N=st.integers(0, 12), E=st.integers(1, 6), data=st.data(), seed=st.integers(0, 2**16))
def test_dispatch_keeps_what_the_gshard_rule_keeps(N, E, data, seed):
    k = data.draw(st.integers(1, E))
    capacity = data.draw(st.one_of(st.none(), st.integers(0, N * k + 1)))
    experts = _random_choices(N, E, k, seed)
    plan = dispatch(experts, E, capacity)
    kept = torch.zeros(N * k, dtype=torch.bool)
    kept[plan.order] = True
    assert kept.view(N, k).tolist() == gshard_kept(experts.tolist(), E, capacity)
    assert plan.order.numel() == int(kept.sum())  # no assignment twice
    flat = experts.reshape(-1)
    assert torch.equal(flat[plan.order], flat[plan.order].sort().values)  # grouped by expert
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(plan.counts, counts)
    assert torch.equal(plan.kept_counts, counts if capacity is None else counts.clamp(max=capacity))


def test_a_second_choice_never_displaces_a_later_first_choice():
    # token 0 picks (1, 0), token 1 picks (0, 2); capacity 1. In flat token order token 0's *second* choice
    # would take expert 0's only place; GShard gives it to token 1's *first* choice.
    experts = torch.tensor([[1, 0], [0, 2]])
    router = FixedRouter(3, experts, torch.tensor([[0.6, 0.4], [0.7, 0.3]]))
    torch.manual_seed(0)
    moe = MoE(8, 6, router, 3, capacity_factor=0.75)  # ceil(0.75 * 4 / 3) = 1
    assert moe.capacity(4) == 1
    kept = gshard_kept(experts.tolist(), 3, 1)
    assert kept == [[True, False], [True, True]]
    x = torch.randn(1, 2, 8)
    expected = oracle_output(moe, x, kept)
    torch.testing.assert_close(moe(x), expected)
    torch.testing.assert_close(dense_reference(moe, x), expected)
    assert moe.stats()["dropped_fraction"] == pytest.approx(1 / 4)


@settings(max_examples=30, deadline=None)
@given(E=st.integers(2, 6), B=st.integers(1, 3), T=st.integers(1, 8), cf=st.floats(0.2, 1.5),
       data=st.data(), seed=st.integers(0, 2**16))
def test_moe_and_dense_reference_equal_the_gshard_oracle(E, B, T, cf, data, seed):
    k = data.draw(st.integers(1, E))
    torch.manual_seed(seed)
    moe = MoE(8, 6, SoftmaxTopKRouter(8, E, k), E, capacity_factor=cf)
    x = torch.randn(B, T, 8)
    with torch.no_grad():
        experts = moe.router(x.reshape(-1, 8)).experts
        expected = oracle_output(moe, x, gshard_kept(experts.tolist(), E, moe.capacity(B * T * k)))
        torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dense_reference(moe, x), expected, atol=1e-5, rtol=1e-5)


# ---- capacity in training only -------------------------------------------------------------------

def test_eval_mode_is_dropless_and_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    moe = MoE(8, 6, SoftmaxTopKRouter(8, 4, 2), 4, capacity_factor=0.25)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        moe.train()
        y_train = moe(x)
        assert moe.stats()["dropped_fraction"] > 0  # training applies the capacity
        torch.testing.assert_close(dense_reference(moe, x), y_train)
        moe.eval()
        y_eval = moe(x)
        assert moe.stats()["dropped_fraction"] == 0.0
        torch.testing.assert_close(dense_reference(moe, x), y_eval)
        alone = torch.cat([moe(x[b:b + 1, t:t + 1]) for b in range(3) for t in range(5)]).view_as(x)
        torch.testing.assert_close(y_eval, alone, atol=1e-6, rtol=1e-5)
        moe.capacity_factor = None
        torch.testing.assert_close(moe(x), y_eval)
    assert not torch.allclose(y_train, y_eval)


SMALL = dict(vocab_size=260, d_model=32, n_layers=3, n_heads=2, max_seq_len=32, init_std=0.3)
GENERATE_CONFIGS = {
    "dense": dict(),
    "softmax": dict(n_experts=4, top_k=2, moe_d_ff=16, first_dense_layers=1),
    "deepseek": dict(n_experts=4, top_k=2, moe_d_ff=16, router="deepseek", n_group=2, topk_group=1),
    "hash": dict(n_experts=4, top_k=2, moe_d_ff=16, router="hash"),
    "task": dict(n_experts=4, top_k=2, moe_d_ff=16, router="task", n_tasks=2),
    "mla": dict(n_experts=4, top_k=2, moe_d_ff=16, attention="mla", kv_lora_rank=12, qk_nope_head_dim=6,
                qk_rope_head_dim=4, v_head_dim=10),
}


@pytest.mark.parametrize("cf", [None, 0.5], ids=["dropless", "cf0.5"])
@pytest.mark.parametrize("name", sorted(GENERATE_CONFIGS))
def test_cached_generation_equals_uncached_with_capacity(name, cf):
    torch.manual_seed(3)
    cfg = ModelConfig(**SMALL, **GENERATE_CONFIGS[name], capacity_factor=cf)
    model = MiniLM(cfg)
    prompt = torch.randint(0, 256, (3, 6))
    kw = {"task_ids": torch.tensor([0, 1, 1])} if cfg.router == "task" and cfg.n_experts else {}
    cached = model.generate(prompt, 12, use_cache=True, **kw)
    uncached = model.generate(prompt, 12, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert model.training  # generate() restores the mode it found


def test_evaluate_does_not_depend_on_batch_composition(tiny_data):
    torch.manual_seed(0)
    model = MiniLM(ModelConfig(**SMALL, n_experts=4, top_k=2, moe_d_ff=16, capacity_factor=0.5))
    _, val = tiny_data
    one = evaluate(model, val, batch_size=1, seq_len=16, max_batches=None)
    many = evaluate(model, val, batch_size=5, seq_len=16, max_batches=None)
    assert one["tokens"] == many["tokens"]
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-5)
    for d in one["loss_by_domain"]:
        assert one["loss_by_domain"][d] == pytest.approx(many["loss_by_domain"][d], rel=1e-5)
    assert model.training


# ---- task extraction keeps the parent's capacity -------------------------------------------------

@pytest.mark.parametrize("cf", [None, 0.5], ids=["dropless", "cf0.5"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_extracted_task_model_equals_the_full_model_with_capacity(tmp_path, cf, training):
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL, n_experts=8, top_k=2, moe_d_ff=16, router="task", n_tasks=2,
                      n_shared_experts=1, first_dense_layers=1, capacity_factor=cf)
    full = MiniLM(cfg).train(training)
    ids = torch.randint(0, 260, (3, 12))
    for task in range(2):
        small = full.extract_task(task).train(training)
        with torch.no_grad():
            expected = full(ids, task_ids=torch.full((3,), task)).logits
            full_drops = [s["dropped_fraction"] for s in full.moe_stats()]
            torch.testing.assert_close(small(ids).logits, expected, atol=1e-5, rtol=1e-5)
            assert [s["dropped_fraction"] for s in small.moe_stats()] == pytest.approx(full_drops)
            if cf is not None and training:
                assert max(full_drops) > 0  # the capacity really bites, so the test means something
            save_checkpoint(tmp_path / f"{task}", small)
            loaded = load_checkpoint(tmp_path / f"{task}").train(training)
            torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
            again = small.extract_task(0)  # extracting from an extracted model changes nothing
            assert again.training == training
            torch.testing.assert_close(again(ids).logits, expected, atol=1e-5, rtol=1e-5)
