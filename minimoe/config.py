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

ATTENTION_KINDS = ("mha",)  # "mha" covers grouped-query attention too (n_kv_heads < n_heads)
PLANNED_ATTENTION_KINDS = ("mla",)  # multi-head latent attention: chapter 1's latent-attention section
ROUTER_KINDS = ("softmax", "deepseek", "hash", "task")


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
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # Mixture-of-Experts fields (n_experts = 0 means every layer is a dense SwiGLU MLP)
    n_experts: int = 0
    top_k: int = 2
    n_shared_experts: int = 0
    moe_d_ff: int | None = None
    router: str = "softmax"
    capacity_factor: float | None = None  # None = dropless
    first_dense_layers: int = 0
    extra: dict = field(default_factory=dict)  # free-form notes (recipe name, ...); ignored by the model

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None and isinstance(self.d_model, int) and self.d_model > 0:
            self.d_ff = 32 * -(-(8 * self.d_model) // (3 * 32))
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
        if self.attention in PLANNED_ATTENTION_KINDS:
            raise ValueError(f"attention={self.attention!r} is not implemented in this version of minimoe; "
                             f"use one of {ATTENTION_KINDS}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ValueError(f"init_std must be a positive number, got {self.init_std!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        self._validate_moe()

    def _validate_moe(self) -> None:
        if not isinstance(self.n_experts, int) or isinstance(self.n_experts, bool) or self.n_experts < 0:
            raise ValueError(f"n_experts must be an integer >= 0 (0 = dense), got {self.n_experts!r}")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
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
                isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0):
            raise ValueError(f"capacity_factor must be None (dropless) or > 0, got {self.capacity_factor!r}")
        raise ValueError(f"n_experts={self.n_experts}: Mixture-of-Experts layers are not implemented in this "
                         "version of minimoe; use n_experts=0 (dense)")

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


def _positive_int(cfg: ModelConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
