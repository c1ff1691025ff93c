import math

import torch

from minimoe import ModelConfig
from minimoe.attention import CausalSelfAttention


def reference_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Textbook attention with an explicit mask and explicit head repetition."""
    B, T, _ = x.shape
    H, Hk, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.qkv(x).split([H * hd, Hk * hd, Hk * hd], dim=-1)
    q = attn.rotary(q.view(B, T, H, hd)).transpose(1, 2)
    k = attn.rotary(k.view(B, T, Hk, hd)).transpose(1, 2)
    v = v.view(B, T, Hk, hd).transpose(1, 2)
    k, v = (t[:, [h // (H // Hk) for h in range(H)]] for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.out(y.transpose(1, 2).reshape(B, T, H * hd))


def test_mha_and_gqa_match_reference():
    torch.manual_seed(0)
    for n_kv in (4, 2, 1):
        attn = CausalSelfAttention(ModelConfig(d_model=32, n_heads=4, n_kv_heads=n_kv, max_seq_len=16))
        x = torch.randn(2, 9, 32)
        torch.testing.assert_close(attn(x), reference_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_gqa_shrinks_the_cache():
    full = CausalSelfAttention(ModelConfig(d_model=32, n_heads=4, n_kv_heads=4))
    grouped = CausalSelfAttention(ModelConfig(d_model=32, n_heads=4, n_kv_heads=1))
    c_full, c_grouped = full.new_cache(1, 8, "cpu", torch.float32), grouped.new_cache(1, 8, "cpu", torch.float32)
    x = torch.randn(1, 8, 32)
    full(x, c_full), grouped(x, c_grouped)
    assert c_full.nbytes() == 4 * c_grouped.nbytes() == 2 * 8 * 32 * 4  # K and V, 8 positions, 32 dims, fp32


def test_cache_in_chunks_equals_full_sequence():
    """Prefill 5 tokens, then a chunk of 3 (needs the explicit offset mask), then single tokens."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=16))
    x = torch.randn(2, 10, 32)
    full = attn(x)
    cache = attn.new_cache(2, 16, "cpu", torch.float32)
    parts = [attn(x[:, :5], cache), attn(x[:, 5:8], cache), attn(x[:, 8:9], cache), attn(x[:, 9:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 10


def test_qk_norm_normalises_each_head_before_rotary():
    from minimoe.attention import CausalSelfAttention
    from minimoe.config import ModelConfig
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=16, qk_norm=True)
    attn = CausalSelfAttention(cfg)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32)
    B, T, H, Hk, hd = 2, 5, 4, 2, 8
    q, k, v = attn.qkv(x).split([H * hd, Hk * hd, Hk * hd], dim=-1)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    q = attn.rotary(rms(q.view(B, T, H, hd), attn.q_norm.weight)).transpose(1, 2)
    k = attn.rotary(rms(k.view(B, T, Hk, hd), attn.k_norm.weight)).transpose(1, 2)
    k, v = k.repeat_interleave(2, dim=1), v.view(B, T, Hk, hd).transpose(1, 2).repeat_interleave(2, dim=1)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = attn.out(y.transpose(1, 2).reshape(B, T, H * hd))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    assert not hasattr(CausalSelfAttention(ModelConfig(d_model=32, n_heads=4)), "q_norm") or \
        CausalSelfAttention(ModelConfig(d_model=32, n_heads=4)).q_norm is None
