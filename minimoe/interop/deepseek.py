"""DeepSeek-V3 (transformers' DeepseekV3ForCausalLM) <-> MiniLM, logit for logit.

A DeepSeek-V3 decoder is a MiniLM with attention="mla" and router="deepseek": multi-head latent attention,
`first_k_dense_replace` dense SwiGLU layers, then Mixture-of-Experts layers with sigmoid scores, a per-expert
correction bias that only steers the choice (`e_score_correction_bias`, minimoe's `router.bias`),
group-limited routing and `routed_scaling_factor`, plus shared experts. The mapping is one table of weights
(`_weight_table`), read in one direction by `from_hf` and in the other by `to_hf`.

Layout differences handled here:
  * rotary embeddings: with `rope_interleave=True` (DeepSeek's default) transformers pairs the rope dims of
    queries and keys as (x0, x1), (x2, x3), ... and returns [rotated evens | rotated odds]; minimoe's Rotary
    pairs dim i with dim i + rope/2. Reordering the rope output rows of q_proj / q_b_proj and of the k_rope
    rows of kv_a_proj_with_mqa to [evens | odds] makes minimoe compute exactly those rotated vectors, so every
    attention score is the same (`_rope_rows`). With rope_interleave=False the rows are copied as they are.
  * experts: transformers stacks gate_up_proj [E, 2f, d] and down_proj [E, d, f] (nn.Linear layout); minimoe's
    GroupedExperts stores w_gate_up [E, d, 2f] and w_down [E, f, d], the transposes ([gate | up] in both).
  * dense and shared MLPs: gate_proj and up_proj are the two halves of minimoe's fused SwiGLU.gate_up.

Reduced precision. transformers keeps the router's gate.weight and e_score_correction_bias in fp32 when it
loads a bf16 checkpoint (`_keep_in_fp32_modules_strict`) and computes the router logits as an fp32 matmul;
minimoe's DeepSeekRouter does the same whatever the model's dtype (minimoe.moe.FP32Router), and `to_hf` of a
bf16 MiniLM keeps those two tensors fp32, as from_pretrained would. So a bf16 model and its conversion choose
the same experts for every token. DeepseekV3RMSNorm rounds the normalised activations to the input dtype before
multiplying by the weight: a converted model has norm_rounding="before_weight".

Balancing. transformers' DeepSeek-V3 computes no balancing loss (its router logits are only recorded) and
never updates the correction bias: a converted model has aux_loss_coef = z_loss_coef = seq_aux_loss_coef = 0,
and a MiniLM with any of them > 0 is refused by `to_hf`. (bias_update_speed is a setting of minimoe's training
loop, which transformers does not have; it is not converted.)

A config field that would change the computation and that the other side cannot express raises ValueError
naming it (YaRN / rope scaling, biases, another activation, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model import MiniLM

ARCHITECTURE = "DeepseekV3ForCausalLM"
# transformers builds q_a_layernorm and kv_a_layernorm with DeepseekV3RMSNorm's default eps, whatever
# rms_norm_eps says; minimoe uses norm_eps for every norm, so the two agree only at this value.
LATENT_NORM_EPS = 1e-6


# ---- configs -----------------------------------------------------------------------------------------------

def config_from_hf(hf_config) -> ModelConfig:
    """The ModelConfig of a transformers DeepseekV3Config, or a ValueError naming a field minimoe lacks."""
    c = hf_config
    _check_hf_config(c)
    rope = getattr(c, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(c, "rope_theta", None) or 10000.0)
    n_experts = int(c.n_routed_experts or 0)
    moe = dict(n_experts=n_experts, router="deepseek")
    if n_experts:
        moe.update(top_k=c.num_experts_per_tok, n_shared_experts=c.n_shared_experts,
                   moe_d_ff=c.moe_intermediate_size, n_group=c.n_group, topk_group=c.topk_group,
                   routed_scaling_factor=float(c.routed_scaling_factor), norm_topk_prob=bool(c.norm_topk_prob))
    extra = {"hf_architecture": ARCHITECTURE, "hf_rope_interleave": bool(c.rope_interleave),
             "hf_token_ids": {name: getattr(c, name, None)
                              for name in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    return ModelConfig(
        vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_attention_heads, d_ff=c.intermediate_size,
        max_seq_len=c.max_position_embeddings, attention="mla", rope_theta=float(rope_theta),
        norm_eps=float(c.rms_norm_eps), norm_rounding="before_weight", tie_embeddings=bool(c.tie_word_embeddings),
        dropout=float(c.attention_dropout or 0.0), init_std=float(c.initializer_range),
        q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
        first_dense_layers=min(int(c.first_k_dense_replace), c.num_hidden_layers), extra=extra, **moe)


def _check_hf_config(c) -> None:
    """ValueError naming the first field of a DeepseekV3Config whose computation minimoe cannot reproduce."""
    def unsupported(field: str, value, why: str):
        raise ValueError(f"DeepseekV3 config field {field}={value!r} is not supported: {why}")

    if getattr(c, "hidden_act", "silu") != "silu":
        unsupported("hidden_act", c.hidden_act, "minimoe's MLPs and experts are SwiGLU (silu)")
    if getattr(c, "attention_bias", False):
        unsupported("attention_bias", c.attention_bias, "minimoe's attention projections have no bias")
    if getattr(c, "mlp_bias", False):
        unsupported("mlp_bias", c.mlp_bias, "minimoe's MLPs have no bias")
    rope = getattr(c, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        unsupported("rope_parameters['rope_type']", rope_type,
                    "minimoe has plain rotary embeddings only (no YaRN / rope scaling, no mscale on the softmax)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported("rope_parameters['partial_rotary_factor']", rope["partial_rotary_factor"],
                    "minimoe rotates all qk_rope_head_dim dims")
    if c.num_key_value_heads is not None and c.num_key_value_heads < c.num_attention_heads:
        # transformers repeats keys and values num_attention_heads // num_key_value_heads times (when that is
        # > 1) although MLA already expands its latent to every head; at or above num_attention_heads
        # (the default config says 128 whatever the head count) the field changes nothing
        unsupported("num_key_value_heads", c.num_key_value_heads,
                    f"MLA gives every head its own keys and values: it must be >= num_attention_heads="
                    f"{c.num_attention_heads}")
    if c.rms_norm_eps != LATENT_NORM_EPS:
        unsupported("rms_norm_eps", c.rms_norm_eps,
                    f"transformers normalises the MLA latents with eps={LATENT_NORM_EPS} whatever rms_norm_eps is, "
                    "and minimoe uses one norm_eps for every norm")
    if getattr(c, "topk_method", "noaux_tc") not in ("noaux_tc", None):
        unsupported("topk_method", c.topk_method, "minimoe's deepseek router is DeepSeek-V3's 'noaux_tc'")
    if getattr(c, "scoring_func", "sigmoid") not in ("sigmoid", None):
        unsupported("scoring_func", c.scoring_func, "minimoe's deepseek router scores with a sigmoid")
    if c.first_k_dense_replace is None:
        unsupported("first_k_dense_replace", None, "transformers needs the number of dense layers")
    if c.n_routed_experts and c.first_k_dense_replace < c.num_hidden_layers:  # there are MoE layers
        for name in ("num_experts_per_tok", "n_group", "topk_group"):
            if getattr(c, name) is None:
                unsupported(name, None, "an MoE layer needs it")


def config_to_hf(cfg: ModelConfig):
    """The transformers DeepseekV3Config of a MiniLM config, or a ValueError naming a field HF lacks."""
    from transformers import DeepseekV3Config

    _check_minimoe_config(cfg)
    n_experts = cfg.n_experts
    tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    tokens.update(cfg.extra.get("hf_token_ids") or {})
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        moe_intermediate_size=cfg.moe_d_ff or cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        n_shared_experts=cfg.n_shared_experts if n_experts else 0, n_routed_experts=n_experts,
        routed_scaling_factor=float(cfg.routed_scaling_factor), kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, n_group=cfg.n_group if n_experts else 1,
        topk_group=cfg.topk_group if n_experts else 1, num_experts_per_tok=cfg.top_k if n_experts else 1,
        first_k_dense_replace=cfg.first_dense_layers if n_experts else cfg.n_layers,
        norm_topk_prob=cfg.norm_topk_prob,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        rope_interleave=bool(cfg.extra.get("hf_rope_interleave", False)), attention_bias=False,
        attention_dropout=cfg.dropout, **tokens)


def _check_minimoe_config(cfg: ModelConfig) -> None:
    """ValueError naming the first MiniLM config field that DeepseekV3ForCausalLM cannot reproduce."""
    def unsupported(field: str, value, why: str):
        raise ValueError(f"cannot convert to {ARCHITECTURE}: {field}={value!r} {why}")

    if cfg.attention != "mla":
        unsupported("attention", cfg.attention, "(DeepSeek-V3 uses multi-head latent attention, 'mla')")
    if cfg.norm_eps != LATENT_NORM_EPS:
        unsupported("norm_eps", cfg.norm_eps, f"(transformers normalises the MLA latents with eps={LATENT_NORM_EPS}, "
                                              "so norm_eps must be that value)")
    if not cfg.n_experts:
        return
    if cfg.router != "deepseek":
        unsupported("router", cfg.router, "(DeepSeek-V3 routes with sigmoid scores and a correction bias: "
                                          "router='deepseek')")
    if cfg.capacity_factor is not None:
        unsupported("capacity_factor", cfg.capacity_factor, "(transformers' DeepSeek-V3 is dropless: None)")
    if cfg.router_precision != "fp32":
        unsupported("router_precision", cfg.router_precision, "(transformers' DeepSeek-V3 computes its router "
                                                              "logits in fp32: 'fp32')")
    for name in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef"):
        if getattr(cfg, name):
            unsupported(name, getattr(cfg, name), "(transformers' DeepSeek-V3 computes no balancing loss: 0)")
    if cfg.n_experts // cfg.n_group < 2:
        unsupported("n_group", cfg.n_group, f"(transformers scores a group by its two best experts, so each of the "
                                            f"n_group groups of n_experts={cfg.n_experts} needs at least 2)")


# ---- weights ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Weight:
    """One minimoe tensor and the transformers tensor(s) it comes from.

    kind: "same" (copied), "q_rope" / "kv_rope" (rope rows reordered when rope_interleave is on),
    "transpose" (stacked experts, last two dims swapped), "cat" (minimoe's fused [gate | up] = two HF tensors).
    """
    minimoe: str
    hf: tuple[str, ...]
    kind: str = "same"


def _weight_table(cfg: ModelConfig) -> list[_Weight]:
    """Every tensor of a MiniLM with `cfg`, paired with its DeepseekV3ForCausalLM counterpart(s)."""
    table = [_Weight("embed.weight", ("model.embed_tokens.weight",)),
             _Weight("norm.weight", ("model.norm.weight",)),
             _Weight("lm_head.weight", ("lm_head.weight",))]
    moe_layers = set(cfg.moe_layers)
    for i in range(cfg.n_layers):
        m, h = f"blocks.{i}.", f"model.layers.{i}."
        table += [_Weight(m + "attn_norm.weight", (h + "input_layernorm.weight",)),
                  _Weight(m + "mlp_norm.weight", (h + "post_attention_layernorm.weight",))]
        a, ha = m + "attn.", h + "self_attn."
        if cfg.q_lora_rank is None:
            table.append(_Weight(a + "q_proj.weight", (ha + "q_proj.weight",), "q_rope"))
        else:
            table += [_Weight(a + "q_a_proj.weight", (ha + "q_a_proj.weight",)),
                      _Weight(a + "q_a_layernorm.weight", (ha + "q_a_layernorm.weight",)),
                      _Weight(a + "q_b_proj.weight", (ha + "q_b_proj.weight",), "q_rope")]
        table += [_Weight(a + "kv_a_proj_with_mqa.weight", (ha + "kv_a_proj_with_mqa.weight",), "kv_rope"),
                  _Weight(a + "kv_a_layernorm.weight", (ha + "kv_a_layernorm.weight",)),
                  _Weight(a + "kv_b_proj.weight", (ha + "kv_b_proj.weight",)),
                  _Weight(a + "out.weight", (ha + "o_proj.weight",))]
        mlp, hm = m + "mlp.", h + "mlp."
        if i not in moe_layers:
            table += [_Weight(mlp + "gate_up.weight", (hm + "gate_proj.weight", hm + "up_proj.weight"), "cat"),
                      _Weight(mlp + "down.weight", (hm + "down_proj.weight",))]
            continue
        table += [_Weight(mlp + "router.gate.weight", (hm + "gate.weight",)),
                  _Weight(mlp + "router.bias", (hm + "gate.e_score_correction_bias",)),
                  _Weight(mlp + "experts.w_gate_up", (hm + "experts.gate_up_proj",), "transpose"),
                  _Weight(mlp + "experts.w_down", (hm + "experts.down_proj",), "transpose")]
        if cfg.n_shared_experts:
            s, hs = mlp + "shared.", hm + "shared_experts."
            table += [_Weight(s + "gate_up.weight", (hs + "gate_proj.weight", hs + "up_proj.weight"), "cat"),
                      _Weight(s + "down.weight", (hs + "down_proj.weight",))]
    return table


def _rope_rows(w: torch.Tensor, group: int, rope: int, inverse: bool = False) -> torch.Tensor:
    """Reorder the rope rows of a projection from DeepSeek's interleaved layout to minimoe's rotate-half one.

    w's rows form blocks of `group` rows (one per head for queries, a single block for kv_a_proj_with_mqa)
    whose last `rope` rows feed the rotary embedding. Within those, rows [r0, r1, r2, r3, ...] (pairs
    (r0, r1), (r2, r3), ...) become [r0, r2, ..., r1, r3, ...] (pairs (i, i + rope/2)); inverse=True undoes it.
    """
    pairs = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])
    order = torch.cat([torch.arange(group - rope), group - rope + pairs])
    if inverse:
        order = torch.argsort(order)
    return w.reshape(-1, group, w.shape[-1])[:, order.to(w.device)].reshape(w.shape)


def _state_from_hf(hf_state: dict, cfg: ModelConfig, interleave: bool) -> dict:
    """A MiniLM state dict from a DeepseekV3ForCausalLM one (`interleave`: the HF config's rope_interleave)."""
    q_group = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    kv_group = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    state = {}
    for w in _weight_table(cfg):
        if w.minimoe == "lm_head.weight" and w.hf[0] not in hf_state:  # tied and left out of the state dict
            hf_state = {**hf_state, w.hf[0]: hf_state["model.embed_tokens.weight"]}
        src = [hf_state[name] for name in w.hf]
        if w.kind == "cat":
            state[w.minimoe] = torch.cat(src, dim=0)
        elif w.kind == "transpose":
            state[w.minimoe] = src[0].transpose(1, 2)
        elif w.kind in ("q_rope", "kv_rope") and interleave:
            group = q_group if w.kind == "q_rope" else kv_group
            state[w.minimoe] = _rope_rows(src[0], group, cfg.qk_rope_head_dim)
        else:
            state[w.minimoe] = src[0]
    return state


def _state_to_hf(state: dict, cfg: ModelConfig, interleave: bool) -> dict:
    """The DeepseekV3ForCausalLM state dict of a MiniLM one: the exact inverse of `_state_from_hf`."""
    q_group = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    kv_group = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    hf_state = {}
    for w in _weight_table(cfg):
        src = state[w.minimoe]
        if w.kind == "cat":
            hf_state[w.hf[0]], hf_state[w.hf[1]] = src.chunk(2, dim=0)
        elif w.kind == "transpose":
            hf_state[w.hf[0]] = src.transpose(1, 2)
        elif w.kind in ("q_rope", "kv_rope") and interleave:
            group = q_group if w.kind == "q_rope" else kv_group
            hf_state[w.hf[0]] = _rope_rows(src, group, cfg.qk_rope_head_dim, inverse=True)
        else:
            hf_state[w.hf[0]] = src
    return hf_state


# ---- models -------------------------------------------------------------------------------------------------

def from_hf(hf_model) -> MiniLM:
    """A MiniLM computing the logits of a transformers DeepseekV3ForCausalLM, with its weights.

    The result has the source's device, dtype and train/eval mode. config.extra records the architecture,
    rope_interleave and the special token ids, so `to_hf` rebuilds the same transformers model.
    Note: MiniLM's Rotary precomputes a table of max_position_embeddings positions.
    """
    cfg = config_from_hf(hf_model.config)
    embed = hf_model.get_input_embeddings().weight
    model = MiniLM(cfg).to(device=embed.device, dtype=embed.dtype)
    state = _state_from_hf(hf_model.state_dict(), cfg, cfg.extra["hf_rope_interleave"])
    model.load_state_dict(state, strict=True)
    return model.train(hf_model.training)


def to_hf(model: MiniLM, architecture: str = ARCHITECTURE):
    """The transformers DeepseekV3ForCausalLM computing what `model` computes, with its weights.

    rope_interleave is the one recorded by `from_hf` (config.extra["hf_rope_interleave"]), else False (the
    weights then map as they are). Raises ValueError for what DeepseekV3ForCausalLM cannot express.
    """
    from transformers import DeepseekV3ForCausalLM

    if architecture != ARCHITECTURE:
        raise ValueError(f"minimoe.interop.deepseek converts to {ARCHITECTURE}, not {architecture}")
    cfg = model.config
    hf_config = config_to_hf(cfg)
    p = model.embed.weight
    hf_model = DeepseekV3ForCausalLM(hf_config).to(device=p.device, dtype=p.dtype)
    _keep_fp32(hf_model, p.dtype)
    state = _state_to_hf(model.state_dict(), cfg, hf_config.rope_interleave)
    # with n_shared_experts=0 transformers still builds a shared-experts MLP, of width 0: nothing to copy
    state.update({name: value for name, value in hf_model.state_dict().items()
                  if name not in state and value.numel() == 0})
    hf_model.load_state_dict(state, strict=True)
    return hf_model.train(model.training)


def _keep_fp32(hf_model, dtype: torch.dtype) -> None:
    """In a bf16 / fp16 model, make the tensors transformers' from_pretrained keeps in fp32 fp32 again
    (`_keep_in_fp32_modules_strict`: the routers' gate.weight and e_score_correction_bias)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return
    keep = tuple(getattr(hf_model, "_keep_in_fp32_modules_strict", None) or ())
    with torch.no_grad():
        for name, t in [*hf_model.named_parameters(), *hf_model.named_buffers()]:
            if any(f".{k}." in f".{name}." for k in keep):  # whole name components: not "gate_proj.weight"
                t.data = t.data.float()
