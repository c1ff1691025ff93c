"""MiniLM with Mixture-of-Experts layers: wiring, accounting, balancing hooks, task routing and extraction."""
import pytest
import torch

from minimoe import ModelConfig
from minimoe.checkpoint import load_checkpoint, save_checkpoint
from minimoe.layers import SwiGLU
from minimoe.model import MiniLM
from minimoe.moe import DeepSeekRouter, MoE

ROUTERS = {
    "softmax": dict(router="softmax"),
    "deepseek": dict(router="deepseek", n_group=2, topk_group=1, routed_scaling_factor=2.0),
    "hash": dict(router="hash"),
    "task": dict(router="task", n_tasks=2),
}


def moe_config(router="softmax", **kw):
    fields = dict(vocab_size=260, d_model=32, n_layers=3, n_heads=2, max_seq_len=32, n_experts=4, top_k=2,
                  moe_d_ff=16, first_dense_layers=1)
    fields.update(ROUTERS[router])
    fields.update(kw)
    return ModelConfig(**fields)


def task_kwargs(cfg, batch):
    return {"task_ids": torch.arange(batch) % cfg.n_tasks} if cfg.router == "task" else {}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_trains_end_to_end(router):
    torch.manual_seed(0)
    cfg = moe_config(router, n_shared_experts=1)
    model = MiniLM(cfg)
    assert isinstance(model.blocks[0].mlp, SwiGLU)  # first_dense_layers=1
    assert all(isinstance(b.mlp, MoE) for b in model.blocks[1:])
    ids = torch.randint(0, 260, (2, 16))
    out = model(ids, targets=ids, **task_kwargs(cfg, 2))
    assert out.logits.shape == (2, 16, 260) and float(out.aux_loss) == 0.0
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name  # every expert of a 4-expert layer sees some of 32 tokens
    stats = model.moe_stats()
    assert len(stats) == 2 and all(sum(s["tokens_per_expert"]) == 2 * 16 * 2 for s in stats)


def test_aux_loss_is_the_weighted_sum_of_layer_losses():
    torch.manual_seed(0)
    ids = torch.randint(0, 260, (2, 16))
    base = MiniLM(moe_config("softmax"))
    weighted = MiniLM(moe_config("softmax", aux_loss_coef=0.01, z_loss_coef=0.001, seq_aux_loss_coef=0.1))
    weighted.load_state_dict(base.state_dict())
    out = weighted(ids)
    expected = sum(m.balance_loss(0.01, 0.001, 0.1) for m in weighted.moe_modules())
    torch.testing.assert_close(out.aux_loss, expected)
    assert float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.logits, base(ids).logits)  # the losses never change the forward
    out.aux_loss.backward()
    assert weighted.blocks[1].mlp.router.gate.weight.grad.abs().sum() > 0


def test_active_parameters_and_flops_count_top_k_experts():
    cfg = moe_config("softmax", n_experts=8, top_k=2, n_shared_experts=1, first_dense_layers=0)
    model = MiniLM(cfg)
    per_expert = 3 * cfg.d_model * cfg.moe_d_ff
    n_moe = len(cfg.moe_layers)
    assert model.num_parameters() - model.num_active_parameters() == n_moe * (8 - 2) * per_expert
    breakdown = model.parameter_breakdown()
    assert breakdown["experts"] == n_moe * 8 * per_expert
    assert breakdown["shared_experts"] == n_moe * per_expert
    assert breakdown["router"] == n_moe * 8 * cfg.d_model
    assert sum(breakdown.values()) == model.num_parameters()
    # a token meets 2 routed + 1 shared expert of width 16: the same matmul weights as a dense layer of width 48
    dense = MiniLM(ModelConfig(**{**cfg.to_dict(), "n_experts": 0, "d_ff": 3 * cfg.moe_d_ff,
                                  "first_dense_layers": 0}))
    router_weights = n_moe * 8 * cfg.d_model
    assert model.flops_per_token(32) == dense.flops_per_token(32) + 6 * router_weights


@pytest.mark.parametrize("router", ["softmax", "deepseek", "hash", "task"])
def test_cached_generation_equals_uncached(router):
    torch.manual_seed(1)
    cfg = moe_config(router)
    model = MiniLM(cfg)
    prompt = torch.randint(0, 256, (2, 5))
    kw = task_kwargs(cfg, 2)
    a = model.generate(prompt, 10, use_cache=True, **kw)
    b = model.generate(prompt, 10, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_deepseek_bias_moves_only_after_training_steps():
    torch.manual_seed(0)
    cfg = moe_config("deepseek", bias_update_speed=0.01)
    model = MiniLM(cfg)
    ids = torch.randint(0, 260, (4, 16))
    router = model.blocks[1].mlp.router
    assert isinstance(router, DeepSeekRouter)
    model.eval()
    model(ids)
    assert model.finish_step() == {}  # eval forwards do not count as training load
    assert router.bias.abs().sum() == 0
    model.train()
    model(ids)
    model(ids)  # two micro-batches of one step
    load = model.blocks[1].mlp.pending_load.clone()
    assert int(load.sum()) == 2 * 4 * 16 * 2
    report = model.finish_step()
    expected = 0.01 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(router.bias, expected)
    assert report["max_vio"] >= 0 and model.blocks[1].mlp.pending_load is None
    assert not any("bias" in n for n, _ in model.named_parameters())  # a buffer: no optimizer touches it


def test_hash_and_task_routing_follow_their_ids():
    cfg = moe_config("hash", first_dense_layers=0)
    model = MiniLM(cfg)
    ids = torch.tensor([[7, 7, 7, 9]])
    model(ids)
    chosen = model.blocks[0].mlp.last_router_output.experts
    assert torch.equal(chosen[0], chosen[1]) and torch.equal(chosen, model.blocks[0].mlp.router.table[ids[0]])
    task = MiniLM(moe_config("task", n_experts=4, top_k=1))
    task(torch.randint(0, 260, (2, 8)), task_ids=torch.tensor([0, 1]))
    experts = task.blocks[1].mlp.last_router_output.experts.view(2, 8)
    assert (experts[0] < 2).all() and (experts[1] >= 2).all()


def test_task_ids_are_checked():
    model = MiniLM(moe_config("task"))
    ids = torch.randint(0, 260, (2, 8))
    with pytest.raises(ValueError, match="task_ids is required"):
        model(ids)
    with pytest.raises(ValueError, match="n_tasks=2"):
        model(ids, task_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="task_ids"):
        model(ids, task_ids=torch.tensor([0, 1, 1]))
    single = MiniLM(moe_config("task", n_tasks=1))
    assert single(ids).logits.shape == (2, 8, 260)  # one task: the id may be left out


def test_extracted_task_model_matches_the_full_model_on_its_task():
    torch.manual_seed(0)
    cfg = moe_config("task", n_experts=8, top_k=2, n_tasks=2, n_shared_experts=1)
    full = MiniLM(cfg)
    ids = torch.randint(0, 260, (3, 12))
    for task in range(2):
        small = full.extract_task(task)
        assert small.config.n_experts == 4 and small.config.n_tasks == 1
        assert small.num_parameters() < full.num_parameters()
        gate_rows_dropped = len(cfg.moe_layers) * (8 - 4) * cfg.d_model  # the gate shrinks with the experts
        assert small.num_active_parameters() == full.num_active_parameters() - gate_rows_dropped
        expected = full(ids, task_ids=torch.full((3,), task)).logits
        torch.testing.assert_close(small(ids).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="task"):
        full.extract_task(2)
    with pytest.raises(ValueError, match="router='task'"):
        MiniLM(moe_config("softmax")).extract_task(0)


def test_checkpoint_keeps_router_buffers(tmp_path):
    for router in ("deepseek", "hash"):
        model = MiniLM(moe_config(router))
        if router == "deepseek":
            model.blocks[1].mlp.router.bias.copy_(torch.linspace(-1, 1, 4))
        save_checkpoint(tmp_path / router, model)
        loaded = load_checkpoint(tmp_path / router, device="cpu")
        for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), n
        ids = torch.randint(0, 260, (2, 8))
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_capacity_dropping_model_runs_and_reports_drops():
    torch.manual_seed(0)
    model = MiniLM(moe_config("softmax", capacity_factor=0.5))
    model(torch.randint(0, 260, (2, 16)))
    assert all(s["dropped_fraction"] >= 0.5 - 1e-9 for s in model.moe_stats())  # at most half fit


# ---- training -------------------------------------------------------------------------------------

def test_training_records_max_vio_and_balances(tiny_data, tiny_train_config):
    import dataclasses
    from minimoe.train import train
    tc = dataclasses.replace(tiny_train_config, steps=4, eval_every=2)
    cfg = moe_config("deepseek", n_group=1, topk_group=1, bias_update_speed=0.05, max_seq_len=32)
    result = train(cfg, tc, data=tiny_data, progress=False)
    assert all("max_vio" in row for row in result.history["train"])
    assert all("val_max_vio" in row for row in result.history["eval"])
    bias = result.model.blocks[1].mlp.router.bias
    # 4 steps of +-0.05 each: every entry is a multiple of 0.05 in [-0.2, 0.2], and they moved
    assert bias.abs().max() <= 0.2 + 1e-6 and bias.abs().sum() > 0
    torch.testing.assert_close(bias / 0.05, (bias / 0.05).round())


def test_task_routed_model_trains_on_domains_and_resumes_exactly(tmp_path, tiny_data, tiny_train_config):
    import dataclasses
    from minimoe.train import train
    cfg = moe_config("task", n_tasks=2)
    tc = dataclasses.replace(tiny_train_config, steps=4, eval_every=2, checkpoint_every=2)
    whole = train(cfg, tc, data=tiny_data, progress=False)
    train(cfg, tc, data=tiny_data, out_dir=tmp_path / "run", stop_after=2, progress=False)
    resumed = train(cfg, tc, data=tiny_data, out_dir=tmp_path / "run", resume=True, progress=False)
    assert [r["loss"] for r in resumed.history["train"]] == [r["loss"] for r in whole.history["train"]]
    with pytest.raises(ValueError, match="n_tasks"):
        train(moe_config("task", n_tasks=1), tc, data=tiny_data, progress=False)  # 2 domains, 1 task
