"""Causal self-attention (multi-head, grouped-query, and DeepSeek's multi-head latent) and its key/value caches."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .layers import RMSNorm, Rotary


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
        # qk_norm: RMSNorm over each head's query and key before rotary (Qwen3), which bounds the logits
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_rounding) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_rounding) if cfg.qk_norm else None

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
        B, T, _ = x.shape
        H, Hk = self.n_heads, self.n_kv_heads
        qkv = self.qkv(x).view(B, T, H + 2 * Hk, self.head_dim)
        past = cache.length if cache is not None else 0
        qk, v = qkv.split([H + Hk, Hk], dim=2)  # split, not two slices: its backward is one cat, not zero-fill + copy
        if self.q_norm is not None:
            q, k = qk.split([H, Hk], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        qk = self.rotary(qk, start=past)         # rotate queries and keys in one pass
        q = qk[:, :, :H].transpose(1, 2)         # [B, H, T, hd]
        k = qk[:, :, H:].transpose(1, 2)         # [B, H_kv, T, hd]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)
        # enable_gqa: each key/value head serves its group of n_heads / n_kv_heads query heads, without
        # copying it n_heads / n_kv_heads times (repeat_interleave) at every step
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, past, x.device),
                                           is_causal=(past == 0 and T > 1),
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
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


# ---- multi-head latent attention (DeepSeek-V2/V3) ------------------------------------------------------------


class LatentKVCache:
    """The cache of multi-head latent attention: only the compressed latent and the shared rotary key.

    Per position it stores c_kv [kv_lora_rank] (after its RMSNorm) and the rotated decoupled key k_rope
    [qk_rope_head_dim], shared by every head: kv_lora_rank + qk_rope_head_dim numbers per layer instead of
    MHA's 2 * n_heads * head_dim (DeepSeek-V2, arXiv 2405.04434, section 2.1.4 and table 1). Keys and values
    are re-expanded from the latent at every step. Pre-allocated and written in place, like KVCache.
    """

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, qk_rope_head_dim: int, device, dtype):
        self.c_kv = torch.zeros(batch, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(batch, max_len, qk_rope_head_dim, device=device, dtype=dtype)
        self.length = 0

    def append(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store c_kv [batch, new, kv_lora_rank] and k_rope [batch, new, qk_rope_head_dim]; return all so far."""
        start, end = self.length, self.length + c_kv.shape[1]
        self.c_kv[:, start:end] = c_kv
        self.k_rope[:, start:end] = k_rope
        self.length = end
        return self.c_kv[:, :end], self.k_rope[:, :end]

    def nbytes(self) -> int:
        """Bytes actually used by the filled positions."""
        per_position = (self.c_kv[:, :1].numel() + self.k_rope[:, :1].numel()) * self.c_kv.element_size()
        return per_position * self.length


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention, MLA (DeepSeek-V2, arXiv 2405.04434, section 2.1; DeepSeek-V3,
    arXiv 2412.19437, eq. 1-11).

    Keys and values are compressed jointly into one small latent per token, which is all the cache keeps:
        [c_kv | k_rope] = W_dkv x,   c_kv <- RMSNorm(c_kv)                   (kv_a_proj_with_mqa, kv_a_layernorm)
        [k_nope_h | v_h] = W_ukv c_kv       for each head h                  (kv_b_proj)
    Rotary positions cannot pass through the up-projection (they would stop it being absorbed, below), so a
    separate "decoupled" rotary key k_rope = RoPE(W_kr x) of qk_rope_head_dim dims is shared by all heads.
    Queries may be compressed too (q_lora_rank; None = one full-rank projection, as in DeepSeek-V2-Lite):
        q = W_uq RMSNorm(W_dq x)   or   q = W_q x,   q_h = [q_nope_h | RoPE(q_rope_h)]
    Head h attends with  softmax([q_nope_h | q_rope_h] . [k_nope_h | k_rope] / sqrt(nope + rope)) v_h,
    and the heads' outputs are concatenated and projected back by `out` (W_o).

    `forward` is the straightforward ("naive") computation: it expands the whole cached latent through
    W_ukv into per-head keys and values at every step. At inference DeepSeek absorbs instead: q_nope_h . W_uk_h
    c_kv = (W_uk_h^T q_nope_h) . c_kv, so W_uk folds into the query, and W_uv into the output projection,
    and attention runs directly on the cached latent; `forward_absorbed` computes that form, with the heads
    folded into the query rows of the one shared key/value head, so that each step reads the cache once.
    Layer names follow DeepSeek-V3 in Hugging Face transformers (q_proj or q_a_proj / q_a_layernorm /
    q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj), except that its o_proj is `out` here.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = self.qk_head_dim ** -0.5
        H = cfg.n_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.d_model, H * self.qk_head_dim, bias=False)                # W_q
        else:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)                   # W_dq
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, cfg.norm_rounding)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)          # W_uq, W_qr
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=False)                                           # W_dkv, W_kr
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps, cfg.norm_rounding)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                   bias=False)                                                    # W_uk, W_uv
        self.out = nn.Linear(H * cfg.v_head_dim, cfg.d_model, bias=False)                         # W_o
        self.rotary = Rotary(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.dropout = cfg.dropout

    def new_cache(self, batch: int, max_len: int, device, dtype) -> LatentKVCache:
        return LatentKVCache(batch, max_len, self.kv_lora_rank, self.qk_rope_head_dim, device, dtype)

    def _queries(self, x: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d_model] -> q_nope [B, H, T, qk_nope_head_dim], rotated q_rope [B, H, T, qk_rope_head_dim]."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, T, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope.transpose(1, 2), self.rotary(q_rope, start=past).transpose(1, 2)

    def _latent(self, x: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d_model] -> normalized c_kv [B, T, kv_lora_rank], rotated k_rope [B, T, qk_rope_head_dim]."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_rope = self.rotary(k_rope[:, :, None], start=past)[:, :, 0]  # one rotary key head, shared by all
        return self.kv_a_layernorm(c_kv), k_rope

    def _attend(self, q, k, v, T: int, past: int) -> torch.Tensor:
        """SDPA with CausalSelfAttention's mask logic (so chunked prefill works) and MLA's score scale."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(T, past, q.device),
                                              is_causal=(past == 0 and T > 1),
                                              dropout_p=self.dropout if self.training else 0.0,
                                              scale=self.softmax_scale)

    def forward(self, x: torch.Tensor, cache: LatentKVCache | None = None) -> torch.Tensor:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]. Expands the latent to per-head keys/values."""
        B, T, _ = x.shape
        H = self.n_heads
        past = cache.length if cache is not None else 0
        q_nope, q_rope = self._queries(x, past)
        c_kv, k_rope = self._latent(x, past)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)
        S = c_kv.shape[1]  # past + T key positions
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)                                         # [B, H, T, nope + rope]
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, S, self.qk_rope_head_dim)], dim=-1)
        y = self._attend(q, k, v, T, past)                                              # [B, H, T, v_head_dim]
        return self.out(y.transpose(1, 2).reshape(B, T, H * self.v_head_dim))

    def forward_absorbed(self, x: torch.Tensor, cache: LatentKVCache | None = None) -> torch.Tensor:
        """The same function as `forward`, computed on the latent without expanding keys or values.

        With W_ukv split per head into W_uk_h [nope, r] and W_uv_h [v, r] (r = kv_lora_rank):
            q_nope_h . (W_uk_h c_kv) = (W_uk_h^T q_nope_h) . c_kv        -> absorb W_uk into the query
            sum_s p_s (W_uv_h c_kv_s) = W_uv_h (sum_s p_s c_kv_s)        -> apply W_uv after attention
        so every head attends over the shared [c_kv | k_rope] with queries [W_uk_h^T q_nope_h | q_rope_h] and
        values c_kv, and the cache is never expanded. DeepSeek-V2 (section 2.1.2) goes one step further and
        multiplies W_uv into W_o ahead of time.

        After absorption all heads share one key/value head, as in multi-query attention. Expanding it to
        n_heads heads (even as a stride-0 view) makes a CPU's SDPA, whose fused kernel needs equal query and
        value widths, fall back to its reference kernel, which materializes n_heads copies of the cache at
        every step. So the heads are folded into the query rows of that single head instead:
        q [B, 1, H * T, r + rope] against k [B, 1, S, r + rope] and v = c_kv [B, 1, S, r]; row h * T + t is
        query t of head h. The cache is read once per step, whatever the attention kernel: on a CPU, where the
        widths still differ, that is the reference kernel's matrix products on one head instead of n_heads
        materialized copies. (A GPU's fused kernels accept both layouts and read a stride-0 view without
        copying it; there folding saves no copy, and on an H200 in bf16 it measured slower at long contexts.)
        T = 1 (decoding) needs no mask; for T > 1 an explicit causal mask [H * T, S] replaces `is_causal`,
        whose alignment assumes one row per query position.

        Meant for inference. In training mode with dropout > 0 it drops attention weights like `forward`: each
        weight of each head and query independently (not the same random draws), since dropout on p_s commutes
        with applying W_uv after the weighted sum.
        x: [batch, seq, d_model] -> [batch, seq, d_model].
        """
        B, T, _ = x.shape
        H, r, rope = self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim
        past = cache.length if cache is not None else 0
        q_nope, q_rope = self._queries(x, past)
        c_kv, k_rope = self._latent(x, past)
        if cache is not None:
            c_kv, k_rope = cache.append(c_kv, k_rope)
        S = c_kv.shape[1]                                                                # past + T
        w_ukv = self.kv_b_proj.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, r)
        w_uk, w_uv = w_ukv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)      # [H, nope, r], [H, v, r]
        q = torch.cat([q_nope @ w_uk, q_rope], dim=-1).reshape(B, 1, H * T, r + rope)  # heads folded into rows
        k = torch.cat([c_kv, k_rope], dim=-1)[:, None]                                  # [B, 1, S, r + rope]
        mask = None
        if T > 1:  # row h * T + t holds the query at position past + t: it sees keys 0 .. past + t
            positions = torch.arange(S, device=x.device)
            mask = (positions[None, :] <= positions[past:, None]).repeat(H, 1)          # [H * T, S]
        y_latent = F.scaled_dot_product_attention(q, k, c_kv[:, None], attn_mask=mask,
                                                  dropout_p=self.dropout if self.training else 0.0,
                                                  scale=self.softmax_scale)             # [B, 1, H * T, r]
        y = y_latent.view(B, H, T, r) @ w_uv.transpose(1, 2)                            # [B, H, T, v_head_dim]
        return self.out(y.transpose(1, 2).reshape(B, T, H * self.v_head_dim))


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of KV cache one token occupies, summed over all layers, with elements of `dtype`.

    MHA / GQA:  2 * n_layers * n_kv_heads * head_dim * element_size        (a key and a value per KV head)
    MLA:        n_layers * (kv_lora_rank + qk_rope_head_dim) * element_size (the latent and the shared rotary key)
    """
    element_size = torch.empty((), dtype=dtype).element_size()
    if cfg.attention == "mla":
        return cfg.n_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * element_size
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * element_size
