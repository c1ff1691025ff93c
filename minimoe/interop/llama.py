"""Llama, Mixtral and Qwen3-MoE <-> MiniLM.

A MiniLM with attention="mha" is a Llama: the same pre-norm blocks, RMSNorm, rotary embeddings in the same
"rotate half" layout (dimension i of a head pairs with i + head_dim/2, as in transformers' `rotate_half`),
grouped-query attention and SwiGLU. Only the storage differs, and the mapping below is exact:

    MiniLM                               transformers (Llama / Mixtral / Qwen3-MoE, transformers >= 5)
    embed.weight                         model.embed_tokens.weight
    blocks.i.attn_norm.weight            model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv.weight             rows [q_proj | k_proj | v_proj] of model.layers.i.self_attn
    blocks.i.attn.out.weight             model.layers.i.self_attn.o_proj.weight
    blocks.i.mlp_norm.weight             model.layers.i.post_attention_layernorm.weight
    blocks.i.mlp.gate_up.weight          rows [gate_proj | up_proj] of model.layers.i.mlp       (dense layer)
    blocks.i.mlp.down.weight             model.layers.i.mlp.down_proj.weight
    blocks.i.mlp.router.gate.weight      model.layers.i.mlp.gate.weight                         (MoE layer)
    blocks.i.mlp.experts.w_gate_up       model.layers.i.mlp.experts.gate_up_proj, transposed: [E, 2f, d] there
    blocks.i.mlp.experts.w_down          model.layers.i.mlp.experts.down_proj, transposed: [E, d, f] there
    norm.weight, lm_head.weight          model.norm.weight, lm_head.weight

Both sides keep [gate | up] in that order. Routing agrees too: Mixtral takes a float32 softmax over the
router logits, keeps the top-k and renormalises them (minimoe's SoftmaxTopKRouter with norm_topk_prob=True);
Qwen3-MoE does the same, renormalising only when its config says norm_topk_prob.

In bf16 the rounding agrees as well. Both compute their router logits in the model's dtype (the gate weight is
bf16, only the softmax is fp32): a converted model has router_precision="input", which computes exactly those
logits (minimoe keeps the gate weight itself in fp32, holding the bf16 values). Their RMSNorm rounds the
normalised activations to bf16 before multiplying by the weight: norm_rounding="before_weight". A MiniLM built
natively (router_precision="fp32", norm_rounding="once") converts too; in fp32 it computes the same logits as
the transformers model, in bf16 transformers rounds in its own way.

Balancing: transformers' `load_balancing_loss_func` pools the router logits of all MoE layers into one Switch
loss (minimoe.moe.pooled_balance_loss), which a converted model computes (aux_loss_pooling="all_layers", with
aux_loss_coef = router_aux_loss_coef when output_router_logits is on, else 0), so its aux_loss is
router_aux_loss_coef * transformers' aux_loss. The other direction needs that pooling: the sum of per-layer
Switch losses (aux_loss_pooling="per_layer", minimoe's default) is about L / k times transformers' loss, and
a router z-loss or DeepSeek-V3 sequence-wise loss has no counterpart, so those raise ValueError.

Qwen3-MoE also normalises every query and key head with its own RMSNorm before the rotary embedding:
ModelConfig(qk_norm=True), with blocks.i.attn.q_norm / k_norm <-> model.layers.i.self_attn.q_norm / k_norm.

Fields that only matter for training and have no minimoe equivalent are ignored: pad_token_id (which only
zeroes the padding row's gradient; transformers' balance loss also skips the rows an attention mask marks as
padding, minimoe has no padding mask). Mixtral's router_jitter_noise > 0, which perturbs routing in training
mode, is refused.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import MiniLM

ARCHITECTURES = ("LlamaForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM")


# ---- transformers -> MiniLM ----------------------------------------------------------------------------------

def from_hf(hf_model) -> MiniLM:
    """A MiniLM with the weights of `hf_model` (LlamaForCausalLM or MixtralForCausalLM) computing its logits.

    Raises ValueError listing every config field that changes the computation and that minimoe cannot
    reproduce. The result is in eval mode, in the dtype of hf_model's embedding (its routers' weights stay
    fp32, see minimoe.moe.FP32Router), and remembers the source class in config.extra["hf_architecture"] so
    that `to_hf` rebuilds the same kind of model.
    """
    architecture = type(hf_model).__name__
    if architecture not in ARCHITECTURES:
        raise ValueError(f"cannot convert {architecture}: this module handles {', '.join(ARCHITECTURES)}")
    cfg = config_from_hf(hf_model.config, architecture)
    hf_state = hf_model.state_dict()
    dtype = hf_state["model.embed_tokens.weight"].dtype
    model = MiniLM(cfg)
    model.load_state_dict(_to_minimoe_state(hf_state, cfg), strict=True)
    return model.to(dtype=dtype).eval()


def config_from_hf(hf_cfg, architecture: str) -> ModelConfig:
    """The ModelConfig of a transformers config of class `architecture`; ValueError for unsupported fields."""
    problems = []
    theta = _rope_theta(hf_cfg, problems)
    d_model, n_heads = hf_cfg.hidden_size, hf_cfg.num_attention_heads
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_cfg.hidden_act!r}: minimoe's MLPs are SwiGLU (silu) only")
    head_dim = getattr(hf_cfg, "head_dim", None)
    if head_dim is not None and head_dim * n_heads != d_model:
        problems.append(f"head_dim={head_dim}: minimoe needs head_dim = hidden_size / num_attention_heads "
                        f"= {d_model / n_heads:g}")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(hf_cfg, name, False):
            problems.append(f"{name}=True: minimoe's projections have no bias")
    if architecture == "Qwen3MoeForCausalLM":
        if getattr(hf_cfg, "use_sliding_window", False):
            problems.append("use_sliding_window=True: minimoe attends over the whole context")
    elif getattr(hf_cfg, "sliding_window", None) is not None:
        problems.append(f"sliding_window={hf_cfg.sliding_window}: minimoe attends over the whole context")
    if getattr(hf_cfg, "router_jitter_noise", 0.0):
        problems.append(f"router_jitter_noise={hf_cfg.router_jitter_noise}: minimoe's router has no jitter")

    fields = dict(
        vocab_size=hf_cfg.vocab_size, d_model=d_model, n_layers=hf_cfg.num_hidden_layers, n_heads=n_heads,
        n_kv_heads=hf_cfg.num_key_value_heads or n_heads, d_ff=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings, attention="mha", rope_theta=float(theta),
        qk_norm=architecture == "Qwen3MoeForCausalLM",
        norm_eps=float(hf_cfg.rms_norm_eps), norm_rounding="before_weight",
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        dropout=float(getattr(hf_cfg, "attention_dropout", 0.0) or 0.0),
        init_std=float(getattr(hf_cfg, "initializer_range", 0.02)),
    )
    if architecture != "LlamaForCausalLM":
        fields.update(_moe_fields(hf_cfg, architecture, problems))
    if problems:
        raise ValueError(f"cannot convert {architecture} to minimoe: " + "; ".join(problems))
    extra = {"hf_architecture": architecture}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(hf_cfg, name, None) is not None:
            extra[name] = getattr(hf_cfg, name)
    return ModelConfig(**fields, extra=extra)


def _rope_theta(hf_cfg, problems: list) -> float:
    """rope_theta of a transformers config (5.x: rope_parameters; 4.x: rope_theta / rope_scaling)."""
    params = getattr(hf_cfg, "rope_parameters", None)
    if params is None:  # transformers 4.x: rope_scaling, when set, replaces the plain rotary embedding
        params = dict(getattr(hf_cfg, "rope_scaling", None) or {})
        if params:
            problems.append(f"rope_scaling={params!r}: minimoe has plain rotary embeddings only")
            params = {}
    params = dict(params)  # in 5.x, rope_scaling is an alias of rope_parameters
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    theta = params.pop("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0))
    if rope_type != "default":
        problems.append(f"rope_parameters.rope_type={rope_type!r}: minimoe has plain ('default') rotary "
                        "embeddings only")
    partial = params.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:
        problems.append(f"rope_parameters.partial_rotary_factor={partial}: minimoe rotates the whole head")
    if params:
        problems.append(f"rope_parameters {sorted(params)}: minimoe has plain rotary embeddings only")
    return theta


def _moe_fields(hf_cfg, architecture: str, problems: list) -> dict:
    """The MoE fields of ModelConfig for Mixtral / Qwen3-MoE."""
    if architecture == "MixtralForCausalLM":
        n_experts, moe_d_ff, norm_topk, first_dense = hf_cfg.num_local_experts, hf_cfg.intermediate_size, True, 0
    else:  # Qwen3-MoE: layer i is dense if i in mlp_only_layers or (i + 1) % decoder_sparse_step != 0
        n_experts, moe_d_ff = hf_cfg.num_experts, hf_cfg.moe_intermediate_size
        norm_topk = bool(hf_cfg.norm_topk_prob)
        n = hf_cfg.num_hidden_layers
        step = hf_cfg.decoder_sparse_step
        dense = [i for i in range(n) if i in set(hf_cfg.mlp_only_layers or []) or (i + 1) % step]
        first_dense = len(dense)
        if dense != list(range(first_dense)):  # minimoe supports "the first k layers are dense" only
            problems.append(f"mlp_only_layers={hf_cfg.mlp_only_layers} / decoder_sparse_step={step}: the dense "
                            f"layers {dense} are not the first k layers (minimoe's first_dense_layers)")
            first_dense = 0
        if n_experts == 0:
            problems.append("num_experts=0: convert a dense model as LlamaForCausalLM")
            n_experts = 1
    aux = float(hf_cfg.router_aux_loss_coef) if getattr(hf_cfg, "output_router_logits", False) else 0.0
    return dict(n_experts=n_experts, top_k=hf_cfg.num_experts_per_tok, moe_d_ff=moe_d_ff, router="softmax",
                norm_topk_prob=norm_topk, first_dense_layers=first_dense, capacity_factor=None,
                router_precision="input", aux_loss_coef=aux, aux_loss_pooling="all_layers")


def _to_minimoe_state(hf: dict, cfg: ModelConfig) -> dict:
    """transformers state dict -> MiniLM state dict (the table in the module docstring)."""
    state = {"embed.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
             "lm_head.weight": hf["model.embed_tokens.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]}
    moe_layers = set(cfg.moe_layers)
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        attn = src + "self_attn."
        state[dst + "attn_norm.weight"] = hf[src + "input_layernorm.weight"]
        state[dst + "mlp_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
        state[dst + "attn.qkv.weight"] = torch.cat([hf[attn + p + "_proj.weight"] for p in "qkv"], dim=0)
        state[dst + "attn.out.weight"] = hf[attn + "o_proj.weight"]
        if cfg.qk_norm:
            state[dst + "attn.q_norm.weight"] = hf[attn + "q_norm.weight"]
            state[dst + "attn.k_norm.weight"] = hf[attn + "k_norm.weight"]
        mlp = src + "mlp."
        if i in moe_layers:
            state[dst + "mlp.router.gate.weight"] = hf[mlp + "gate.weight"]
            state[dst + "mlp.experts.w_gate_up"] = hf[mlp + "experts.gate_up_proj"].transpose(1, 2)
            state[dst + "mlp.experts.w_down"] = hf[mlp + "experts.down_proj"].transpose(1, 2)
        else:
            state[dst + "mlp.gate_up.weight"] = torch.cat([hf[mlp + "gate_proj.weight"],
                                                           hf[mlp + "up_proj.weight"]], dim=0)
            state[dst + "mlp.down.weight"] = hf[mlp + "down_proj.weight"]
    return state


# ---- MiniLM -> transformers ----------------------------------------------------------------------------------

def to_hf(model: MiniLM, architecture: str):
    """The transformers model of class `architecture` computing `model`'s logits, with its weights.

    Built on the CPU in float32, eval mode, eager attention. Raises ValueError naming every MiniLM feature
    the target class cannot express (MLA, non-softmax routers, capacity limits, shared experts, ...).
    """
    hf_cfg = config_to_hf(model.config, architecture)
    import transformers
    hf_model = getattr(transformers, architecture)(hf_cfg)
    state = _to_hf_state(model.state_dict(), model.config)
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf_model.load_state_dict({k: v.detach().float().contiguous() for k, v in state.items()}, strict=True)
    return hf_model.float().eval()


def config_to_hf(cfg: ModelConfig, architecture: str):
    """The transformers config of class `architecture` for a ModelConfig; ValueError for what it cannot express."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"cannot convert to {architecture}: this module handles {', '.join(ARCHITECTURES)}")
    problems = []
    if cfg.qk_norm != (architecture == "Qwen3MoeForCausalLM"):
        problems.append(f"qk_norm={cfg.qk_norm}: {architecture} " +
                        ("always normalises queries and keys" if not cfg.qk_norm else "has no query/key norm"))
    if cfg.attention != "mha":
        problems.append(f"attention={cfg.attention!r}: {architecture} has standard multi-head attention")
    if architecture == "LlamaForCausalLM":
        if cfg.n_experts:
            problems.append(f"n_experts={cfg.n_experts}: LlamaForCausalLM is dense (use MixtralForCausalLM)")
    else:
        if not cfg.n_experts:
            problems.append(f"n_experts=0: {architecture} is a Mixture-of-Experts (use LlamaForCausalLM)")
        if cfg.router != "softmax":
            problems.append(f"router={cfg.router!r}: {architecture} routes by softmax top-k")
        if cfg.capacity_factor is not None:
            problems.append(f"capacity_factor={cfg.capacity_factor}: {architecture} is dropless")
        if cfg.n_shared_experts:
            problems.append(f"n_shared_experts={cfg.n_shared_experts}: {architecture} has no shared experts")
        if cfg.aux_loss_coef and cfg.aux_loss_pooling != "all_layers":
            problems.append(f"aux_loss_pooling={cfg.aux_loss_pooling!r} with aux_loss_coef={cfg.aux_loss_coef}: "
                            f"{architecture}'s balance loss pools all layers (aux_loss_pooling='all_layers')")
        for name in ("z_loss_coef", "seq_aux_loss_coef"):
            if getattr(cfg, name):
                problems.append(f"{name}={getattr(cfg, name)}: {architecture} has no such loss")
        if architecture == "MixtralForCausalLM":
            if cfg.first_dense_layers:
                problems.append(f"first_dense_layers={cfg.first_dense_layers}: every Mixtral layer is MoE")
            if not cfg.norm_topk_prob:
                problems.append("norm_topk_prob=False: Mixtral always renormalises the top-k probabilities")
    if problems:
        raise ValueError(f"cannot convert to {architecture}: " + "; ".join(problems))

    import transformers
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout, initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        bos_token_id=cfg.extra.get("bos_token_id"), eos_token_id=cfg.extra.get("eos_token_id"),
        pad_token_id=cfg.extra.get("pad_token_id"), attn_implementation="eager",
    )
    moe = dict(num_experts_per_tok=cfg.top_k, output_router_logits=bool(cfg.aux_loss_coef),
               router_aux_loss_coef=float(cfg.aux_loss_coef or 0.001))
    if architecture == "LlamaForCausalLM":
        return transformers.LlamaConfig(intermediate_size=cfg.d_ff, attention_bias=False, mlp_bias=False,
                                        **common)
    if architecture == "MixtralForCausalLM":
        # every Mixtral layer is MoE (first_dense_layers=0 above), so d_ff is unused: the experts' width is it
        return transformers.MixtralConfig(intermediate_size=cfg.moe_d_ff, num_local_experts=cfg.n_experts,
                                          sliding_window=None, router_jitter_noise=0.0, **moe, **common)
    return transformers.Qwen3MoeConfig(
        intermediate_size=cfg.d_ff, moe_intermediate_size=cfg.moe_d_ff, num_experts=cfg.n_experts,
        norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
        mlp_only_layers=list(range(cfg.first_dense_layers)),
        attention_bias=False, use_sliding_window=False, **moe, **common)


def _to_hf_state(state: dict, cfg: ModelConfig) -> dict:
    """MiniLM state dict -> transformers state dict (the inverse of `_to_minimoe_state`)."""
    H, Hk, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    hf = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["lm_head.weight"]}
    moe_layers = set(cfg.moe_layers)
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        attn = dst + "self_attn."
        hf[dst + "input_layernorm.weight"] = state[src + "attn_norm.weight"]
        hf[dst + "post_attention_layernorm.weight"] = state[src + "mlp_norm.weight"]
        q, k, v = state[src + "attn.qkv.weight"].split([H * hd, Hk * hd, Hk * hd], dim=0)
        hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"] = q, k, v
        hf[attn + "o_proj.weight"] = state[src + "attn.out.weight"]
        if cfg.qk_norm:
            hf[attn + "q_norm.weight"] = state[src + "attn.q_norm.weight"]
            hf[attn + "k_norm.weight"] = state[src + "attn.k_norm.weight"]
        mlp = dst + "mlp."
        if i in moe_layers:
            hf[mlp + "gate.weight"] = state[src + "mlp.router.gate.weight"]
            hf[mlp + "experts.gate_up_proj"] = state[src + "mlp.experts.w_gate_up"].transpose(1, 2)
            hf[mlp + "experts.down_proj"] = state[src + "mlp.experts.w_down"].transpose(1, 2)
        else:
            gate, up = state[src + "mlp.gate_up.weight"].chunk(2, dim=0)
            hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"] = gate, up
            hf[mlp + "down_proj.weight"] = state[src + "mlp.down.weight"]
    return hf
