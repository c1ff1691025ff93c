import json

import pytest

from minimoe import ModelConfig


def test_defaults_resolve_and_round_trip(tmp_path):
    cfg = ModelConfig(d_model=96, n_heads=4)
    assert cfg.n_kv_heads == 4 and cfg.head_dim == 24
    assert cfg.d_ff % 32 == 0 and cfg.d_ff >= 8 * 96 / 3
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert json.loads(cfg.to_json())["d_model"] == 96


@pytest.mark.parametrize("fields, name", [
    (dict(d_model=100, n_heads=3), "d_model"),
    (dict(n_heads=4, n_kv_heads=3), "n_heads"),
    (dict(d_model=0), "d_model"),
    (dict(n_layers=-1), "n_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(d_ff=0), "d_ff"),
    (dict(n_heads=2.5), "n_heads"),
    (dict(d_model=12, n_heads=4), "head_dim"),
    (dict(attention="sparse"), "attention"),
    (dict(attention="mla", kv_lora_rank=0), "kv_lora_rank"),
    (dict(attention="mla", q_lora_rank=-2), "q_lora_rank"),
    (dict(router="magic"), "router"),
    (dict(n_experts=-1), "n_experts"),
    (dict(n_experts=4, top_k=5), "top_k"),
    (dict(n_experts=4, capacity_factor=0.0), "capacity_factor"),
    (dict(first_dense_layers=9), "first_dense_layers"),
    (dict(n_experts=8, router="deepseek", n_group=3), "n_group"),
    (dict(n_experts=8, router="deepseek", n_group=2, topk_group=3), "topk_group"),
    (dict(n_experts=8, top_k=5, router="deepseek", n_group=2, topk_group=1), "top_k"),
    (dict(n_experts=8, router="softmax", n_group=2), "n_group"),
    (dict(n_experts=8, top_k=3, router="task", n_tasks=4), "n_tasks"),
    (dict(n_experts=8, router="softmax", n_tasks=2), "n_tasks"),
    (dict(n_experts=4, capacity_factor=-1.0), "capacity_factor"),
    (dict(n_experts=4, routed_scaling_factor=0), "routed_scaling_factor"),
    (dict(n_experts=4, aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(n_experts=4, router="hash", z_loss_coef=1e-3), "z_loss_coef"),
    (dict(n_experts=4, router="softmax", bias_update_speed=1e-3), "bias_update_speed"),
    (dict(n_experts=4, norm_topk_prob="yes"), "norm_topk_prob"),
    (dict(rope_theta=0), "rope_theta"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(dropout=1.0), "dropout"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(norm_rounding="twice"), "norm_rounding"),
    (dict(norm_rounding=None), "norm_rounding"),
    (dict(n_experts=4, router_precision="bf16"), "router_precision"),
    (dict(n_experts=4, aux_loss_pooling="mean"), "aux_loss_pooling"),
])
def test_invalid_fields_raise_naming_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        ModelConfig(**fields)


def test_moe_and_mla_defaults():
    cfg = ModelConfig(d_model=64, n_layers=3, n_heads=4, n_experts=8, router="deepseek", first_dense_layers=1)
    assert cfg.moe_d_ff == cfg.d_ff and cfg.bias_update_speed == 1e-3 and cfg.moe_layers == [1, 2]
    assert ModelConfig(n_experts=0).moe_layers == []
    assert ModelConfig(n_experts=4, router="softmax").bias_update_speed is None
    mla = ModelConfig(d_model=64, n_heads=4, attention="mla")
    assert (mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim) == (16, 16, 8, 16)
    assert mla.q_lora_rank is None
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and ModelConfig.from_dict(mla.to_dict()) == mla


def test_from_dict_rejects_unknown_fields_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="d_modle"):
        ModelConfig.from_dict({"d_modle": 64})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "bad.json")


def test_precision_and_pooling_fields_default_and_round_trip():
    cfg = ModelConfig(n_experts=4)
    assert (cfg.norm_rounding, cfg.router_precision, cfg.aux_loss_pooling) == ("once", "fp32", "per_layer")
    hf_style = ModelConfig(n_experts=4, norm_rounding="before_weight", router_precision="input",
                           aux_loss_coef=0.01, aux_loss_pooling="all_layers")
    d = json.loads(hf_style.to_json())
    assert (d["norm_rounding"], d["router_precision"], d["aux_loss_pooling"]) == ("before_weight", "input",
                                                                                  "all_layers")
    assert ModelConfig.from_dict(hf_style.to_dict()) == hf_style
    old = cfg.to_dict()  # a config.json written before these fields existed loads with the defaults
    for name in ("norm_rounding", "router_precision", "aux_loss_pooling"):
        del old[name]
    assert ModelConfig.from_dict(old) == cfg
