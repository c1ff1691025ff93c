"""ModelConfig: every size and switch of a MiniLM, validated in one place.

A config is plain data: it round-trips through JSON (`to_dict` / `from_dict`) and is saved as
`config.json` beside every checkpoint. Any invalid field or combination raises `ValueError` naming
the field, so a typo fails at construction instead of deep inside a forward pass.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# "mha" covers grouped-query attention too (n_kv_heads < n_heads); "mla" is DeepSeek's multi-head latent attention
ATTENTION_KINDS = ("mha", "mla")
ROUTER_KINDS = ("softmax", "deepseek", "hash", "task")
# how RMSNorm rounds in bf16/fp16: "once" = normalise and scale in fp32, round once; "before_weight" = round the
# normalised activations to the input dtype, then multiply by the weight (transformers' Llama, Mixtral, Qwen3,
# DeepSeek-V3)
NORM_ROUNDINGS = ("once", "before_weight")
# the router's logits: "fp32" = an fp32 matmul of fp32 weights, autocast off (DeepSeek's inference code and
# transformers' DeepSeek-V3); "input" = a matmul in the dtype of the router's input, autocast as usual
# (transformers' Mixtral, Qwen3-MoE). Either way the gate weight is stored in fp32 (minimoe.moe.FP32Router)
ROUTER_PRECISIONS = ("fp32", "input")
# the Switch balance loss over the MoE layers: "per_layer" = the sum of each layer's loss; "all_layers" = one
# loss of the assignments and probabilities pooled over all layers (transformers' load_balancing_loss_func)
AUX_LOSS_POOLINGS = ("per_layer", "all_layers")


@dataclass
class ModelConfig:
    vocab_size: int = 260           # ByteTokenizer: 256 bytes + 4 special tokens
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None   # None = n_heads (plain multi-head); fewer = grouped-query attention
    d_ff: int | None = None         # SwiGLU hidden size; None = 8/3 * d_model rounded up to a multiple of 32
    max_seq_len: int = 256
    attention: str = "mha"
    qk_norm: bool = False                 # RMSNorm on each query and key head before rotary (Qwen3, OLMo-2)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    norm_rounding: str = "once"           # see NORM_ROUNDINGS; models from transformers use "before_weight"
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # Multi-head latent attention (attention="mla", DeepSeek-V2/V3); ignored for "mha". None = default below.
    q_lora_rank: int | None = None        # query compression rank; None = full-rank queries (DeepSeek-V2-Lite)
    kv_lora_rank: int | None = None       # the cached latent's width; default d_model // 4
    qk_nope_head_dim: int | None = None   # per-head query/key dims without rotary; default head_dim
    qk_rope_head_dim: int | None = None   # decoupled rotary dims (one key shared by all heads); default head_dim // 2
    v_head_dim: int | None = None         # per-head value dims; default head_dim
    # Mixture-of-Experts fields (n_experts = 0 means every layer is a dense SwiGLU MLP)
    n_experts: int = 0
    top_k: int = 2
    n_shared_experts: int = 0
    moe_d_ff: int | None = None           # width of one expert (and of one shared expert); None = d_ff
    router: str = "softmax"
    capacity_factor: float | None = None  # None = dropless
    first_dense_layers: int = 0           # DeepSeek-V3's first_k_dense_replace: the first k layers stay dense
    norm_topk_prob: bool = True           # softmax/task routers: renormalise the k kept probabilities
    n_group: int = 1                      # deepseek router: group-limited routing over n_group groups ...
    topk_group: int = 1                   # ... of which a token may use topk_group
    routed_scaling_factor: float = 1.0    # deepseek router: scale of the combine weights
    n_tasks: int = 1                      # task router: number of tasks (each owns n_experts // n_tasks experts)
    hash_seed: int = 0                    # hash router: seed of the fixed token -> expert table
    router_precision: str = "fp32"        # see ROUTER_PRECISIONS; Mixtral / Qwen3-MoE from transformers: "input"
    # balancing (coefficients multiply losses added to ModelOutput.aux_loss)
    aux_loss_coef: float = 0.0            # Switch load-balancing loss
    aux_loss_pooling: str = "per_layer"   # see AUX_LOSS_POOLINGS; Mixtral / Qwen3-MoE from transformers: "all_layers"
    z_loss_coef: float = 0.0              # router z-loss
    seq_aux_loss_coef: float = 0.0        # DeepSeek-V3 sequence-wise balance loss
    bias_update_speed: float | None = None  # deepseek router's gamma; None = 1e-3 (DeepSeek-V3), 0 = off
    extra: dict = field(default_factory=dict)  # free-form notes (recipe name, ...); ignored by the model

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None and isinstance(self.d_model, int) and self.d_model > 0:
            self.d_ff = 32 * -(-(8 * self.d_model) // (3 * 32))
        if self.attention == "mla" and _ints(self.d_model, self.n_heads) and self.n_heads > 0:
            hd = self.d_model // self.n_heads
            defaults = dict(kv_lora_rank=self.d_model // 4, qk_nope_head_dim=hd, qk_rope_head_dim=hd // 2,
                            v_head_dim=hd)
            for name, value in defaults.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.n_experts and self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff
        if self.router == "deepseek" and self.bias_update_speed is None:
            self.bias_update_speed = 1e-3
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            _positive_int(self, name)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for rotary embeddings "
                             "(change d_model or n_heads)")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        _one_of(self, "norm_rounding", NORM_ROUNDINGS)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ValueError(f"init_std must be a positive number, got {self.init_std!r}")
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"qk_norm must be True or False, got {self.qk_norm!r}")
        if self.qk_norm and self.attention == "mla":
            raise ValueError("qk_norm applies to attention='mha' only (MLA normalises its latents instead)")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        if self.attention == "mla":
            self._validate_mla()
        self._validate_moe()

    def _validate_mla(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive_int(self, name)
        if self.q_lora_rank is not None:
            _positive_int(self, "q_lora_rank")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even for rotary embeddings")

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers whose MLP is a Mixture-of-Experts (empty for a dense model)."""
        return list(range(self.first_dense_layers, self.n_layers)) if self.n_experts else []

    def _validate_moe(self) -> None:
        if not isinstance(self.n_experts, int) or isinstance(self.n_experts, bool) or self.n_experts < 0:
            raise ValueError(f"n_experts must be an integer >= 0 (0 = dense), got {self.n_experts!r}")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
        _one_of(self, "router_precision", ROUTER_PRECISIONS)
        _one_of(self, "aux_loss_pooling", AUX_LOSS_POOLINGS)
        if not isinstance(self.first_dense_layers, int) or not 0 <= self.first_dense_layers <= self.n_layers:
            raise ValueError(f"first_dense_layers must be an integer in [0, n_layers={self.n_layers}], "
                             f"got {self.first_dense_layers!r}")
        if self.n_experts == 0:
            return
        _positive_int(self, "top_k")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} cannot exceed n_experts={self.n_experts}")
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be an integer >= 0, got {self.n_shared_experts!r}")
        if self.moe_d_ff is not None:
            _positive_int(self, "moe_d_ff")
        if self.capacity_factor is not None and not (
                _number(self.capacity_factor) and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be None (dropless) or > 0, got {self.capacity_factor!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"norm_topk_prob must be True or False, got {self.norm_topk_prob!r}")
        for name in ("n_group", "topk_group", "n_tasks"):
            _positive_int(self, name)
        if self.n_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide n_experts={self.n_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} cannot exceed n_group={self.n_group}")
        if self.router == "deepseek" and self.top_k > self.topk_group * (self.n_experts // self.n_group):
            raise ValueError(f"top_k={self.top_k} exceeds the experts reachable in topk_group={self.topk_group} "
                             f"groups of {self.n_experts // self.n_group}")
        if self.router != "deepseek" and (self.n_group, self.topk_group) != (1, 1):
            raise ValueError(f"n_group / topk_group apply to router='deepseek' only (router={self.router!r})")
        if self.router == "task" and self.n_experts // self.n_tasks < self.top_k:
            raise ValueError(f"n_tasks={self.n_tasks}: each task owns n_experts // n_tasks = "
                             f"{self.n_experts // self.n_tasks} experts, fewer than top_k={self.top_k}")
        if self.router != "task" and self.n_tasks != 1:
            raise ValueError(f"n_tasks applies to router='task' only (router={self.router!r})")
        if not (_number(self.routed_scaling_factor) and self.routed_scaling_factor > 0):
            raise ValueError(f"routed_scaling_factor must be a positive number, got {self.routed_scaling_factor!r}")
        if not isinstance(self.hash_seed, int) or isinstance(self.hash_seed, bool):
            raise ValueError(f"hash_seed must be an integer, got {self.hash_seed!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef"):
            value = getattr(self, name)
            if not (_number(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.router == "hash" and (self.aux_loss_coef or self.z_loss_coef or self.seq_aux_loss_coef):
            raise ValueError("aux_loss_coef / z_loss_coef / seq_aux_loss_coef need a learned router; "
                             "router='hash' has none")
        gamma = self.bias_update_speed
        if gamma is not None and not (_number(gamma) and gamma >= 0):
            raise ValueError(f"bias_update_speed must be a number >= 0, got {gamma!r}")
        if self.router != "deepseek" and gamma:
            raise ValueError(f"bias_update_speed applies to router='deepseek' only (router={self.router!r})")

    # ---- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(d)


def _ints(*values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_of(cfg: ModelConfig, name: str, choices: tuple) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _positive_int(cfg: ModelConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
