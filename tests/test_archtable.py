"""The architecture table (claim A3): equal active size, utilization, expert bytes, row schema, published counts.

No timing is asserted: the tiny runs only check that timings are produced and positive.
"""
from __future__ import annotations

import math

import pytest
import torch

from minimoe import MiniLM, ModelConfig
from minimoe.archtable import (ARCHITECTURES, ARTICLE_COLUMNS, ARTICLE_TABLE, DEEPSEEK_V3, MIXTRAL_8X7B, ROW_KEYS,
                               PublishedMoE, architecture_rows, build_model, experts_for_utilization,
                               expert_parameters, latency_sweep, mla_attention_params, path_parameters,
                               published_counts, routed_utilization, utilization)

SEQ = 64  # any sequence length: the attention term of flops_per_token is the same for every model here


@pytest.fixture(scope="module")
def models():
    return {name: build_model(name, "cpu") for name in ARCHITECTURES}


def test_five_architectures_with_the_article_columns():
    assert list(ARCHITECTURES) == ["dense", "softmax-top2", "deepseekmoe", "hash", "task"]
    columns = {a.article_column for a in ARCHITECTURES.values()} - {""}
    assert columns == set(ARTICLE_COLUMNS)
    assert all(len(v) == len(ARTICLE_COLUMNS) for v in ARTICLE_TABLE.values())
    cfg = ARCHITECTURES["deepseekmoe"].config()
    assert cfg.router == "deepseek" and cfg.first_dense_layers == 1 and cfg.n_shared_experts >= 1
    assert ARCHITECTURES["hash"].config().router == "hash"
    assert ARCHITECTURES["task"].config().n_tasks == 2
    # config() hands out a fresh object every time: editing one never changes the table
    a, b = ARCHITECTURES["dense"].config(), ARCHITECTURES["dense"].config()
    a.d_ff = 8
    assert b.d_ff == ARCHITECTURES["dense"].config().d_ff != 8


def test_equal_active_flops_and_parameters(models):
    dense = models["dense"]
    ref_flops, ref_active = dense.flops_per_token(SEQ), dense.num_active_parameters()
    for name, model in models.items():
        # only the routers' gates differ: within 2% of the dense model's training FLOPs per token
        assert abs(model.flops_per_token(SEQ) / ref_flops - 1) < 0.02, name
        assert abs(model.num_active_parameters() / ref_active - 1) < 0.02, name
        cfg = model.config
        if cfg.n_experts:  # the same active expert width per token as the dense d_ff
            assert (cfg.top_k + cfg.n_shared_experts) * cfg.moe_d_ff == cfg.d_ff, name
    # the hash router has no gate, so its active size equals the dense model's exactly
    assert models["hash"].flops_per_token(SEQ) == ref_flops


def test_utilization(models):
    for name, model in models.items():
        u = utilization(model)
        assert u == model.num_active_parameters() / model.num_parameters()
        if model.config.n_experts:
            assert 0 < u < 1, name
            assert routed_utilization(model.config) == model.config.top_k / model.config.n_experts
        else:
            assert u == 1.0 and routed_utilization(model.config) is None


def test_expert_parameters_match_the_weights(models):
    for name, model in models.items():
        cfg = model.config
        if not cfg.n_experts:
            assert expert_parameters(cfg) == 0
            continue
        moe = model.moe_modules()[0]
        one = moe.experts.w_gate_up[0].numel() + moe.experts.w_down[0].numel()
        assert expert_parameters(cfg) == one == 3 * cfg.d_model * cfg.moe_d_ff, name


def test_path_parameters_equal_the_extracted_task_model(models):
    task = models["task"]
    for t in range(task.config.n_tasks):
        assert path_parameters(task, t) == task.extract_task(t).num_parameters()
    assert path_parameters(task) < task.num_parameters()
    with pytest.raises(ValueError, match="task-routed"):
        path_parameters(models["dense"])
    with pytest.raises(ValueError, match="task must be"):
        path_parameters(task, 2)


def test_rows_schema_on_a_tiny_run():
    rows = architecture_rows(device="cpu", tokens=16, repeats=1, seq_len=8)
    assert [r["name"] for r in rows] == list(ARCHITECTURES)
    for r in rows:
        assert tuple(r) == ROW_KEYS
        assert r["tokens"] == 16 and r["batch"] * r["seq_len"] == 16
        assert r["layer_ms"] > 0 and r["model_ms"] > 0 and math.isfinite(r["model_ms"])
        assert r["utilization"] == r["active_params"] / r["total_params"]
        assert r["model_bytes_fp32"] == 4 * r["total_params"] == 2 * r["model_bytes_bf16"]
        assert r["kv_bytes_per_token"] > 0
        assert "thread" in r["device"]
        cfg = ARCHITECTURES[r["name"]].config()
        if cfg.n_experts:
            assert r["expert_bytes_fp32"] == 3 * cfg.d_model * cfg.moe_d_ff * 4
            assert r["expert_bytes_bf16"] == 3 * cfg.d_model * cfg.moe_d_ff * 2
            assert r["utilization"] < 1
        else:
            assert r["expert_bytes_fp32"] is None and r["utilization"] == 1
        assert (r["path_params"] is not None) == (r["name"] == "task")
    only = architecture_rows(device="cpu", tokens=8, repeats=1, seq_len=8, names=["task"])
    assert [r["name"] for r in only] == ["task"] and only[0]["path_bytes_bf16"] == 2 * only[0]["path_params"]


def test_latency_sweep_tiny():
    points = latency_sweep(token_counts=(8, 16), device="cpu", repeats=1, seq_len=8, names=["dense", "hash"])
    assert [(p["name"], p["tokens"]) for p in points] == [("dense", 8), ("dense", 16), ("hash", 8), ("hash", 16)]
    assert all(p["layer_ms"] > 0 for p in points)
    dense_mlp = build_model("dense", "cpu").blocks[-1].mlp
    assert all(p["weights_read"] == sum(q.numel() for q in dense_mlp.parameters()) and p["experts_used"] is None
               for p in points if p["name"] == "dense")
    cfg = ARCHITECTURES["hash"].config()
    for p in points:
        if p["name"] == "hash":  # no gate: exactly the experts used, at most one per token
            assert 1 <= p["experts_used"] <= min(cfg.n_experts, p["tokens"])
            assert p["weights_read"] == p["experts_used"] * expert_parameters(cfg)


def test_weights_read_counts_only_the_experts_used(models):
    from minimoe.archtable import weights_read
    model = models["deepseekmoe"]
    moe = model.moe_modules()[-1]
    with pytest.raises(RuntimeError):
        weights_read(build_model("deepseekmoe", "cpu").moe_modules()[-1])
    with torch.inference_mode():
        model(torch.zeros(1, 1, dtype=torch.long))  # one token: top_k routed experts
    read, used = weights_read(moe)
    cfg = model.config
    assert used == cfg.top_k
    gate = cfg.d_model * cfg.n_experts
    assert read == gate + (cfg.n_shared_experts + cfg.top_k) * expert_parameters(cfg)


def test_bad_names_and_repeats():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("gpt-4")
    with pytest.raises(ValueError, match="repeats"):
        architecture_rows(device="cpu", tokens=8, repeats=0, seq_len=8, names=["dense"])
    with pytest.raises(ValueError, match="tokens"):
        architecture_rows(device="cpu", tokens=0, repeats=1, names=["dense"])


# ---- the accounting for published configurations --------------------------------------------------

def _small_mla_moe() -> ModelConfig:
    return ModelConfig(vocab_size=260, d_model=64, n_layers=3, n_heads=4, attention="mla", q_lora_rank=32,
                       kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, d_ff=128,
                       n_experts=8, top_k=2, n_shared_experts=1, moe_d_ff=32, router="deepseek", n_group=2,
                       topk_group=1, first_dense_layers=1, tie_embeddings=False, max_seq_len=32)


def test_mla_formula_matches_minimoe_attention():
    cfg = _small_mla_moe()
    attn = MiniLM(cfg).blocks[0].attn
    assert sum(p.numel() for p in attn.parameters()) == mla_attention_params(64, 4, 32, 16, 16, 8, 16)
    full = ModelConfig(**{**cfg.to_dict(), "q_lora_rank": None})
    attn = MiniLM(full).blocks[0].attn
    assert sum(p.numel() for p in attn.parameters()) == mla_attention_params(64, 4, None, 16, 16, 8, 16)


@pytest.mark.parametrize("tie", [False, True])
def test_published_counts_match_minilm(tie):
    """The formula used for DeepSeek-V3 gives exactly MiniLM's own counts on a small model of the same shape."""
    cfg = ModelConfig(**{**_small_mla_moe().to_dict(), "tie_embeddings": tie})
    model = MiniLM(cfg)
    spec = PublishedMoE(name="small", source="test", vocab_size=260, d_model=64, n_layers=3, n_dense_layers=1,
                        d_ff=128, moe_d_ff=32, n_experts=8, n_shared_experts=1, top_k=2,
                        attention_params=mla_attention_params(64, 4, 32, 16, 16, 8, 16), tie_embeddings=tie)
    c = published_counts(spec)
    assert c["total"] == model.num_parameters()
    assert c["active"] == model.num_active_parameters()
    breakdown = model.parameter_breakdown()
    assert c["parts"]["routed_experts"] == breakdown["experts"]
    assert c["parts"]["shared_experts"] == breakdown["shared_experts"]
    assert c["parts"]["router"] == breakdown["router"]


def test_deepseek_v3_and_mixtral_reproduce_their_reports():
    ds = published_counts(DEEPSEEK_V3)
    assert ds["expert_params"] == 3 * 7168 * 2048 == 44_040_192
    assert ds["n_moe_layers"] == 58
    assert abs(ds["total"] / 671e9 - 1) < 0.005
    assert abs(ds["active"] / 37e9 - 1) < 0.03
    assert abs(ds["active_without_input_embedding"] / 36.6e9 - 1) < 0.005  # README_WEIGHTS.md's figure
    assert 0.05 < ds["utilization"] < 0.06
    mx = published_counts(MIXTRAL_8X7B)
    assert abs(mx["total"] / 46.7e9 - 1) < 0.005 and abs(mx["active"] / 12.9e9 - 1) < 0.005
    assert 0.27 < mx["utilization"] < 0.28


def test_experts_for_utilization_round_trip():
    for spec in (DEEPSEEK_V3, MIXTRAL_8X7B):
        c = published_counts(spec)
        assert experts_for_utilization(c, spec.top_k, c["utilization"]) == pytest.approx(spec.n_experts)
        e = experts_for_utilization(c, spec.top_k, 0.83)
        a, s = c["always_on"], c["routed_params_per_expert_slot"]
        assert (a + spec.top_k * s) / (a + e * s) == pytest.approx(0.83)
    with pytest.raises(ValueError):
        experts_for_utilization(published_counts(DEEPSEEK_V3), 8, 0.0)


def test_rows_on_cuda_when_present():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rows = architecture_rows(device="cuda", tokens=64, repeats=1, seq_len=32, names=["dense", "deepseekmoe"])
    assert all(r["layer_ms"] > 0 and "thread" not in r["device"] for r in rows)


def test_format_bytes():
    from minimoe.archtable import format_bytes
    assert format_bytes(None) == "n/a"
    assert format_bytes(512) == "512 B"
    assert format_bytes(88_080_384) == "88.1 MB"
    assert format_bytes(1.2e9) == "1.2 GB"
    assert format_bytes(1.342e12) == "1.34 TB"
