"""minimoe.interop.deepseek: DeepseekV3ForCausalLM <-> MiniLM, checked logit for logit on tiny random models.

Every transformers model here is built offline from a DeepseekV3Config (never downloaded), with random
weights of a larger scale than the default init and a random, non-zero e_score_correction_bias large enough to
change which experts are chosen, so a mistake in any layer, in the rotary layout or in the routing shows up
in the logits.
"""
from __future__ import annotations

import pytest
import torch

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from minimoe.config import ModelConfig
from minimoe.interop import deepseek, from_transformers, to_transformers
from minimoe.model import MiniLM

# transformers builds DeepSeek's shared-experts MLP even when n_shared_experts=0, with zero-width layers
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")

VOCAB = 97
TOLERANCE = 1e-4  # max |logit difference| in fp32

# name -> DeepseekV3Config overrides: query compression on/off, 0 or 1 dense layers, group-limited routing,
# 0-2 shared experts, both rotary layouts, tied and untied embeddings
CASES = {
    "full_q-dense1-groups1of1-shared1": dict(q_lora_rank=None, first_k_dense_replace=1, n_group=1, topk_group=1,
                                             n_shared_experts=1),
    "lora_q-dense0-groups2of4-shared2": dict(q_lora_rank=12, first_k_dense_replace=0, n_group=4, topk_group=2,
                                             n_shared_experts=2),
    "lora_q-dense1-groups2of4-rotate_half": dict(q_lora_rank=12, first_k_dense_replace=1, n_group=4, topk_group=2,
                                                 n_shared_experts=1, rope_interleave=False),
    "full_q-dense0-noshared-tied": dict(q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1,
                                        n_shared_experts=0, tie_word_embeddings=True),
}


def hf_config(**overrides) -> DeepseekV3Config:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                  num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
                  v_head_dim=8, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
                  norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=64, rope_theta=500.0,
                  rope_interleave=True, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None)
    fields.update(overrides)
    return DeepseekV3Config(**fields)


def randomize(model):
    """Weights of std 0.2, norm weights in [0.5, 1.5], correction biases of std 0.3 (either library's names)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:  # norm weights
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "router.bias")):
                b.normal_(0.0, 0.3)
    return model


def hf_model(seed: int = 0, **overrides) -> DeepseekV3ForCausalLM:
    """A tiny DeepseekV3ForCausalLM in eval mode with random weights and a random correction bias."""
    torch.manual_seed(seed)
    return randomize(DeepseekV3ForCausalLM(hf_config(**overrides)).eval())


def random_ids(seed: int = 1, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(hf, model, ids) -> float:
    with torch.no_grad():
        return (hf(ids).logits - model(ids).logits).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_logits_match(case):
    hf = hf_model(**CASES[case])
    model = from_transformers(hf)
    assert isinstance(model, MiniLM) and not model.training
    cfg = model.config
    assert cfg.attention == "mla" and cfg.router == "deepseek" and cfg.extra["hf_architecture"] == deepseek.ARCHITECTURE
    assert cfg.first_dense_layers == CASES[case]["first_k_dense_replace"]
    assert len(model.moe_modules()) == 2 - cfg.first_dense_layers
    diff = max_logit_diff(hf, model, random_ids())
    assert diff <= TOLERANCE, f"{case}: max |logit diff| = {diff:.3g}"


def test_correction_bias_is_copied_and_changes_choices():
    hf = hf_model()
    model = from_transformers(hf)
    router = model.moe_modules()[0].router
    assert torch.equal(router.bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        chosen = router(x).experts.sort(-1).values
        saved = router.bias.clone()
        router.bias.zero_()
        unbiased = router(x).experts.sort(-1).values
        router.bias.copy_(saved)
    assert (chosen != unbiased).any(dim=-1).float().mean() > 0.2  # the bias steers many tokens elsewhere


def test_rope_interleave_layout_matters():
    """The interleaved -> rotate-half reordering is needed: without it the logits differ a lot."""
    hf = hf_model()
    model = from_transformers(hf)
    hf.config.rope_interleave = False  # the same weights read in the other layout
    assert max_logit_diff(hf, model, random_ids()) > 1e-2


@pytest.mark.parametrize("case", ["full_q-dense1-groups1of1-shared1", "lora_q-dense0-groups2of4-shared2"])
def test_greedy_generation_matches(case):
    hf = hf_model(**CASES[case])
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    model = from_transformers(hf)
    ids = random_ids(seed=3, batch=2, seq=6)
    with torch.no_grad():
        expected = hf.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    got = model.generate(ids, 10)
    assert expected.shape == got.shape == (2, 16)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("case", CASES)
def test_round_trip_reproduces_the_state_dict(case):
    hf = hf_model(**CASES[case])
    again = to_transformers(from_transformers(hf))
    assert isinstance(again, DeepseekV3ForCausalLM)
    assert again.config.rope_interleave == hf.config.rope_interleave
    assert again.config.tie_word_embeddings == hf.config.tie_word_embeddings
    original, rebuilt = hf.state_dict(), again.state_dict()
    assert list(original) == list(rebuilt)
    for name, value in original.items():
        assert torch.equal(value, rebuilt[name]), name


def native_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, d_ff=40, max_seq_len=64, attention="mla",
                  q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10,
                  norm_eps=1e-6, tie_embeddings=True, n_experts=6, top_k=2, n_shared_experts=1, moe_d_ff=8,
                  router="deepseek", first_dense_layers=1, n_group=3, topk_group=2, routed_scaling_factor=1.5)
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.mark.parametrize("interleave", [False, True])
def test_minilm_to_transformers_and_back(interleave):
    torch.manual_seed(4)
    model = randomize(MiniLM(native_config(extra={"hf_rope_interleave": interleave})).eval())
    hf = to_transformers(model)  # architecture chosen from the config: MLA -> DeepSeek-V3
    assert isinstance(hf, DeepseekV3ForCausalLM) and hf.config.rope_interleave == interleave
    assert max_logit_diff(hf, model, random_ids()) <= TOLERANCE
    back = from_transformers(hf)
    original, rebuilt = model.state_dict(), back.state_dict()
    assert list(original) == list(rebuilt)
    for name, value in original.items():
        assert torch.equal(value, rebuilt[name]), name


def test_dense_mla_model_converts():
    torch.manual_seed(5)
    model = randomize(MiniLM(native_config(n_experts=0, first_dense_layers=0)).eval())
    hf = to_transformers(model)
    assert hf.config.first_k_dense_replace == 3
    assert max_logit_diff(hf, model, random_ids()) <= TOLERANCE
    back = from_transformers(hf)
    assert not back.moe_modules()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 500.0,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}


@pytest.mark.parametrize("field, overrides", [
    ("hidden_act", dict(hidden_act="gelu")),
    ("attention_bias", dict(attention_bias=True)),
    ("rope_type", dict(rope_parameters=YARN)),
    ("num_key_value_heads", dict(num_key_value_heads=2)),
    ("rms_norm_eps", dict(rms_norm_eps=1e-5)),
])
def test_unsupported_transformers_fields_raise(field, overrides):
    with pytest.raises(ValueError, match=field):
        from_transformers(DeepseekV3ForCausalLM(hf_config(**overrides)))


@pytest.mark.parametrize("first_dense", [2, 1])  # without and with MoE layers
def test_norm_topk_prob_false_converts_exactly(first_dense):
    hf = hf_model(norm_topk_prob=False, first_k_dense_replace=first_dense)
    model = from_transformers(hf)
    assert max_logit_diff(hf, model, random_ids()) <= TOLERANCE
    back = to_transformers(model)
    assert back.config.norm_topk_prob is False
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("field, overrides", [
    ("attention", dict(attention="mha", q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=None,
                       qk_rope_head_dim=None, v_head_dim=None)),
    ("router", dict(router="softmax", n_group=1, topk_group=1, bias_update_speed=0.0)),
    ("capacity_factor", dict(capacity_factor=1.25)),
    ("norm_eps", dict(norm_eps=1e-5)),
    ("n_group", dict(n_group=6, topk_group=2)),
    ("router_precision", dict(router_precision="input")),
    ("aux_loss_coef", dict(aux_loss_coef=0.01)),  # transformers' DeepSeek-V3 computes no balancing loss
    ("z_loss_coef", dict(z_loss_coef=1e-3)),
    ("seq_aux_loss_coef", dict(seq_aux_loss_coef=1e-4)),
])
def test_unsupported_minimoe_fields_raise(field, overrides):
    model = MiniLM(native_config(**overrides))
    with pytest.raises(ValueError, match=field):
        to_transformers(model, "DeepseekV3ForCausalLM")


def test_other_architecture_is_refused():
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        deepseek.to_hf(MiniLM(native_config()), "LlamaForCausalLM")


def test_bf16_conversion_keeps_the_router_fp32():
    """Like transformers' from_pretrained with dtype=bfloat16 (`_keep_in_fp32_modules_strict`): the router's
    gate.weight and e_score_correction_bias stay fp32 on both sides, everything else is bf16."""
    model = from_transformers(hf_model()).to(torch.bfloat16)
    assert model.config.norm_rounding == "before_weight" and model.config.router_precision == "fp32"
    router = model.moe_modules()[0].router
    assert router.gate.weight.dtype == router.bias.dtype == torch.float32
    hf = to_transformers(model)
    gate = hf.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.weight, router.gate.weight) and torch.equal(gate.e_score_correction_bias, router.bias)
    assert hf.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert hf.model.layers[1].mlp.shared_experts.gate_proj.weight.dtype == torch.bfloat16
    back = from_transformers(hf)
    assert torch.equal(back.moe_modules()[0].router.gate.weight, router.gate.weight)
