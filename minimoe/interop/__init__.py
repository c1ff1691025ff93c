"""Conversion between `minimoe.MiniLM` and Hugging Face `transformers` models, logit for logit.

    from minimoe.interop import from_transformers, to_transformers
    model = from_transformers(hf_model)      # a MiniLM computing the same logits
    hf_again = to_transformers(model)        # the matching transformers model, same weights

One module per family holds the weight and config mapping (`llama.py`: Llama, Mixtral, Qwen3-MoE;
`deepseek.py`: DeepSeek-V3). A config field that changes the computation and that minimoe does not support
raises ValueError naming it: a conversion never silently builds a different model.
"""
from __future__ import annotations

LLAMA_FAMILY = ("LlamaForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM")
DEEPSEEK_FAMILY = ("DeepseekV3ForCausalLM",)


def from_transformers(hf_model):
    """A MiniLM with the weights and computation of `hf_model` (one of LLAMA_FAMILY or DEEPSEEK_FAMILY)."""
    name = type(hf_model).__name__
    if name in LLAMA_FAMILY:
        from .llama import from_hf
    elif name in DEEPSEEK_FAMILY:
        from .deepseek import from_hf
    else:
        raise ValueError(f"cannot convert {name}: supported are {', '.join(LLAMA_FAMILY + DEEPSEEK_FAMILY)}")
    return from_hf(hf_model)


def to_transformers(model, architecture: str | None = None):
    """The transformers model computing what `model` computes, with its weights.

    architecture: the transformers class name to build; default: the one the model was converted from
    (config.extra["hf_architecture"]), else chosen from the config (MLA or a DeepSeek router ->
    DeepseekV3ForCausalLM; dense -> LlamaForCausalLM; softmax experts -> MixtralForCausalLM).
    """
    cfg = model.config
    if architecture is None:
        architecture = cfg.extra.get("hf_architecture")
    if architecture is None:
        if cfg.attention == "mla" or (cfg.n_experts and cfg.router == "deepseek"):
            architecture = "DeepseekV3ForCausalLM"
        elif not cfg.n_experts:
            architecture = "LlamaForCausalLM"
        else:
            architecture = "MixtralForCausalLM"
    if architecture in LLAMA_FAMILY:
        from .llama import to_hf
    elif architecture in DEEPSEEK_FAMILY:
        from .deepseek import to_hf
    else:
        raise ValueError(f"cannot convert to {architecture}: supported are {', '.join(LLAMA_FAMILY + DEEPSEEK_FAMILY)}")
    return to_hf(model, architecture)
