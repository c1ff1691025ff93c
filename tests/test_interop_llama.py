"""minimoe.interop.llama: Llama, Mixtral and Qwen3-MoE <-> MiniLM, checked logit for logit on small random models.

Every transformers model here is built offline from a config (never downloaded) with random weights of
realistic scale, including the norms, so that a transposed or swapped tensor could not go unnoticed.
"""
from __future__ import annotations

import pytest
import torch

import transformers

from minimoe.config import ModelConfig
from minimoe.interop import from_transformers, to_transformers
from minimoe.interop.llama import config_from_hf, config_to_hf
from minimoe.model import MiniLM

VOCAB = 300


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter: N(0, 1/sqrt(fan_in)) matrices, norm weights around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return module.eval()


def llama(seed=0, **kw):
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                  rms_norm_eps=1e-6, attn_implementation="eager", eos_token_id=None, bos_token_id=None)
    fields.update(kw)
    torch.manual_seed(seed)
    return _randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)), seed)


def mixtral(seed=0, **kw):
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                  num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                  attn_implementation="eager", eos_token_id=None, bos_token_id=None)
    fields.update(kw)
    torch.manual_seed(seed)
    return _randomize(transformers.MixtralForCausalLM(transformers.MixtralConfig(**fields)), seed)


def qwen3_moe(seed=0, **kw):
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=24,
                  max_position_embeddings=64, num_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-6,
                  attn_implementation="eager", eos_token_id=None, bos_token_id=None)
    fields.update(kw)
    torch.manual_seed(seed)
    return _randomize(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**fields)), seed)


SHAPES = {
    "llama-gqa": lambda: llama(0),
    "llama-mha-tied": lambda: llama(1, num_key_value_heads=4, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "llama-mqa-3layers": lambda: llama(2, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "mixtral-e4-top2": lambda: mixtral(3),
    "mixtral-e8-top1-tied": lambda: mixtral(4, num_local_experts=8, num_experts_per_tok=1,
                                            tie_word_embeddings=True, num_key_value_heads=4,
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen3-moe-norm-topk": lambda: qwen3_moe(5, norm_topk_prob=True),
    "qwen3-moe-first-dense-no-norm": lambda: qwen3_moe(6, norm_topk_prob=False, mlp_only_layers=[0]),
}


def _ids(seed: int, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request):
    hf = SHAPES[request.param]()
    return request.param, hf, from_transformers(hf)


def test_logits_match(pair):
    name, hf, model = pair
    ids = _ids(1)
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids).logits
    diff = (got - expected).abs().max().item()
    assert got.shape == expected.shape
    assert diff <= 1e-4, f"{name}: max |logit difference| = {diff:.2e}"
    assert expected.std() > 0.5  # the random weights make logits that actually differ between tokens


def test_greedy_generation_matches(pair):
    _, hf, model = pair
    prompt = _ids(2, batch=2, seq=6)
    ours = model.generate(prompt, 10)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                             attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours, theirs)


def test_round_trip_reproduces_state_dict(pair):
    name, hf, model = pair
    again = to_transformers(model)
    assert type(again) is type(hf)
    original, rebuilt = hf.state_dict(), again.state_dict()
    assert list(rebuilt) == list(original)
    for key, value in original.items():
        assert torch.equal(rebuilt[key], value), f"{name}: {key} differs"
    assert model.config.extra["hf_architecture"] == type(hf).__name__


def test_minilm_to_hf_and_back():
    """A MiniLM built natively (GQA, untied, experts narrower than d_ff) survives MiniLM -> Mixtral -> MiniLM."""
    torch.manual_seed(5)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, max_seq_len=40,
                      tie_embeddings=False, n_experts=4, top_k=2, moe_d_ff=32, rope_theta=2000.0)
    model = _randomize(MiniLM(cfg), 5)
    hf = to_transformers(model)
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = _ids(3)
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
    back = from_transformers(hf)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

    dense = _randomize(MiniLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)), 6)
    hf_dense = to_transformers(dense)
    assert type(hf_dense).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert (hf_dense(ids[:, :16]).logits - dense(ids[:, :16]).logits).abs().max().item() <= 1e-4


# ---- unsupported fields -------------------------------------------------------------------------------------

BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96)


@pytest.mark.parametrize("field, value", [
    ("attention_bias", True),
    ("mlp_bias", True),
    ("hidden_act", "gelu"),
    ("head_dim", 32),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
])
def test_unsupported_llama_fields_raise(field, value):
    cfg = transformers.LlamaConfig(**BASE, **{field: value})
    with pytest.raises(ValueError, match=field.split("_parameters")[0]):
        config_from_hf(cfg, "LlamaForCausalLM")


@pytest.mark.parametrize("field, value", [("sliding_window", 16), ("router_jitter_noise", 0.1)])
def test_unsupported_mixtral_fields_raise(field, value):
    cfg = transformers.MixtralConfig(**BASE, num_local_experts=4, **{field: value})
    with pytest.raises(ValueError, match=field):
        config_from_hf(cfg, "MixtralForCausalLM")


def test_qk_norm_must_match_the_target():
    model = MiniLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, n_experts=4, max_seq_len=16))
    with pytest.raises(ValueError, match="qk_norm"):
        to_transformers(model, "Qwen3MoeForCausalLM")  # Qwen3 always normalises queries and keys
    normed = MiniLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, n_experts=4, max_seq_len=16,
                                qk_norm=True))
    with pytest.raises(ValueError, match="qk_norm"):
        to_transformers(normed, "MixtralForCausalLM")


@pytest.mark.parametrize("fields, architecture, named", [
    (dict(attention="mla"), "LlamaForCausalLM", "attention"),
    (dict(n_experts=4), "LlamaForCausalLM", "n_experts"),
    (dict(n_experts=4, router="deepseek"), "MixtralForCausalLM", "router"),
    (dict(n_experts=4, capacity_factor=1.25), "MixtralForCausalLM", "capacity_factor"),
    (dict(n_experts=4, n_shared_experts=1), "MixtralForCausalLM", "n_shared_experts"),
    (dict(n_experts=4, first_dense_layers=1), "MixtralForCausalLM", "first_dense_layers"),
    (dict(n_experts=4, norm_topk_prob=False), "MixtralForCausalLM", "norm_topk_prob"),
    ({}, "MixtralForCausalLM", "n_experts"),
    (dict(n_experts=4, aux_loss_coef=0.01), "MixtralForCausalLM", "aux_loss_pooling"),  # per-layer sum: not HF's
    (dict(n_experts=4, z_loss_coef=1e-3), "MixtralForCausalLM", "z_loss_coef"),
    (dict(n_experts=4, seq_aux_loss_coef=1e-2, qk_norm=True), "Qwen3MoeForCausalLM", "seq_aux_loss_coef"),
])
def test_unsupported_minilm_features_raise(fields, architecture, named):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, **fields)
    with pytest.raises(ValueError, match=named):
        config_to_hf(cfg, architecture)


@pytest.mark.parametrize("norm_topk_prob, top_k", [(False, 2), (True, 2), (False, 1)])
def test_qwen3_moe_block_maps_exactly(norm_topk_prob, top_k):
    """Qwen3-MoE's sparse block (everything but its qk-norm attention) equals minimoe's MoE after the mapping."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from minimoe.interop.llama import _moe_fields
    from minimoe.moe import build_moe

    hf_cfg = transformers.Qwen3MoeConfig(**BASE, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=top_k,
                                         norm_topk_prob=norm_topk_prob)
    problems = []
    fields = _moe_fields(hf_cfg, "Qwen3MoeForCausalLM", problems)
    assert not problems and fields["n_experts"] == 8 and fields["moe_d_ff"] == 24
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=4, **fields)
    hf_block = _randomize(Qwen3MoeSparseMoeBlock(hf_cfg), 7)
    ours = build_moe(cfg)
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf_block.gate.weight)
        ours.experts.w_gate_up.copy_(hf_block.experts.gate_up_proj.transpose(1, 2))
        ours.experts.w_down.copy_(hf_block.experts.down_proj.transpose(1, 2))
        x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(8))
        assert (ours(x) - hf_block(x)).abs().max().item() <= 1e-5


def test_qwen3_moe_dense_layers():
    """mlp_only_layers / decoder_sparse_step map to first_dense_layers when the dense layers come first."""
    from minimoe.interop.llama import _moe_fields

    def fields(**kw):
        cfg = transformers.Qwen3MoeConfig(**{**BASE, "num_hidden_layers": 4}, moe_intermediate_size=24,
                                          num_experts=4, **kw)
        problems = []
        return _moe_fields(cfg, "Qwen3MoeForCausalLM", problems), problems

    assert fields(mlp_only_layers=[0, 1])[0]["first_dense_layers"] == 2
    assert fields()[0]["first_dense_layers"] == 0
    assert "mlp_only_layers" in fields(mlp_only_layers=[2])[1][0]
    assert "decoder_sparse_step" in fields(decoder_sparse_step=2)[1][0]


def test_converted_configs_compute_like_transformers_in_bf16():
    """Router logits in the input's dtype (Mixtral, Qwen3-MoE), norms rounded before the weight (all), and
    transformers' pooled balance loss with router_aux_loss_coef when output_router_logits is on."""
    base = {**BASE, "num_local_experts": 4}
    cfg = config_from_hf(transformers.MixtralConfig(**base, output_router_logits=True, router_aux_loss_coef=0.02),
                         "MixtralForCausalLM")
    assert (cfg.router_precision, cfg.norm_rounding, cfg.aux_loss_pooling, cfg.aux_loss_coef) == \
        ("input", "before_weight", "all_layers", 0.02)
    assert config_from_hf(transformers.MixtralConfig(**base), "MixtralForCausalLM").aux_loss_coef == 0.0
    assert config_from_hf(transformers.LlamaConfig(**BASE), "LlamaForCausalLM").norm_rounding == "before_weight"
    hf_cfg = config_to_hf(cfg, "MixtralForCausalLM")
    assert hf_cfg.output_router_logits and hf_cfg.router_aux_loss_coef == 0.02
