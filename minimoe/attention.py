"""Causal self-attention (multi-head and grouped-query) and its key/value cache."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import Rotary


class KVCache:
    """Pre-allocated keys and values for one attention layer: [batch, n_kv_heads, max_len, head_dim] each.

    Writing in place into a fixed buffer (instead of torch.cat per step) keeps each decode step O(1) in
    allocation; `length` is how many positions are filled.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [batch, n_kv_heads, new, head_dim]; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        """Bytes actually used by the filled positions."""
        per_position = (self.k[:, :, :1].numel() + self.v[:, :, :1].numel()) * self.k.element_size()
        return per_position * self.length


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head) + causal mask) V over n_heads query heads (Vaswani et al., 2017).

    With n_kv_heads < n_heads, groups of query heads share one key/value head: grouped-query attention
    (Ainslie et al., 2023), which shrinks the KV cache by n_heads / n_kv_heads.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.dropout = cfg.dropout

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
        B, T, _ = x.shape
        H, Hk = self.n_heads, self.n_kv_heads
        qkv = self.qkv(x).view(B, T, H + 2 * Hk, self.head_dim)
        past = cache.length if cache is not None else 0
        qk, v = qkv.split([H + Hk, Hk], dim=2)  # split, not two slices: its backward is one cat, not zero-fill + copy
        qk = self.rotary(qk, start=past)         # rotate queries and keys in one pass
        q = qk[:, :, :H].transpose(1, 2)         # [B, H, T, hd]
        k = qk[:, :, H:].transpose(1, 2)         # [B, H_kv, T, hd]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)
        if self.n_kv_heads != self.n_heads:  # share each key/value head across its group of query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, past, x.device),
                                           is_causal=(past == 0 and T > 1),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


def _causal_mask(T: int, past: int, device) -> torch.Tensor | None:
    """Mask for T new queries after `past` cached positions; None where SDPA needs none.

    past == 0: SDPA's built-in causal mask (is_causal=True). T == 1: the one new query sees everything.
    Otherwise query i (at position past + i) may see keys 0 .. past + i.
    """
    if past == 0 or T == 1:
        return None
    q_pos = torch.arange(T, device=device)[:, None] + past
    return torch.arange(past + T, device=device)[None, :] <= q_pos
