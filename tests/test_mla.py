"""Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1) and its latent-only KV cache."""
import math

import pytest
import torch

from minimoe import ModelConfig
from minimoe.attention import LatentKVCache, MultiHeadLatentAttention, kv_cache_bytes_per_token
from minimoe.model import Cache, MiniLM


def mla_config(q_lora_rank=None, **overrides) -> ModelConfig:
    """Tiny MLA sizes, every MLA width different, so a swapped split or dimension cannot go unnoticed."""
    sizes = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, attention="mla",
                 q_lora_rank=q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10)
    return ModelConfig(**{**sizes, **overrides})


Q_LORA_RANKS = pytest.mark.parametrize("q_lora_rank", [None, 16], ids=["full_rank_q", "compressed_q"])


# ---- an independent reference: plain matmuls, explicit rotation angles, scores, mask and softmax --------------

def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, positions, theta):
    """Rotate dims (i, i + d/2) of x [..., T, d] by the angle pos * theta^(-2i/d) (RoFormer, rotate-half layout)."""
    d = x.shape[-1]
    angle = positions[:, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos().float(), angle.sin().float()
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_mla(attn: MultiHeadLatentAttention, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2 eq. 9-19, one head at a time."""
    B, T, _ = x.shape
    H, nope, rope_dim, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    pos = torch.arange(T)
    if cfg.q_lora_rank is None:
        q = x @ attn.q_proj.weight.T
    else:
        c_q = rms_norm(x @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight, cfg.norm_eps)
        q = c_q @ attn.q_b_proj.weight.T
    q = q.view(B, T, H, nope + rope_dim)
    compressed = x @ attn.kv_a_proj_with_mqa.weight.T
    c_kv = rms_norm(compressed[..., :r], attn.kv_a_layernorm.weight, cfg.norm_eps)
    k_rope = rope(compressed[..., r:], pos, cfg.rope_theta)                  # one key, shared by every head
    kv = (c_kv @ attn.kv_b_proj.weight.T).view(B, T, H, nope + cfg.v_head_dim)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()                      # query i sees keys 0 .. i
    heads = []
    for h in range(H):
        q_h = torch.cat([q[:, :, h, :nope], rope(q[:, :, h, nope:], pos, cfg.rope_theta)], dim=-1)
        k_h = torch.cat([kv[:, :, h, :nope], k_rope], dim=-1)
        v_h = kv[:, :, h, nope:]
        scores = q_h @ k_h.transpose(1, 2) / math.sqrt(nope + rope_dim)      # [B, T, T]
        scores = scores.masked_fill(~allowed, float("-inf"))
        heads.append(scores.softmax(dim=-1) @ v_h)
    return torch.cat(heads, dim=-1) @ attn.out.weight.T


@Q_LORA_RANKS
def test_matches_reference_full_and_token_by_token(q_lora_rank):
    torch.manual_seed(0)
    cfg = mla_config(q_lora_rank)
    attn = MultiHeadLatentAttention(cfg)
    x = torch.randn(2, 9, cfg.d_model)
    expected = reference_mla(attn, cfg, x)
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    cache = attn.new_cache(2, 16, "cpu", torch.float32)
    steps = torch.cat([attn(x[:, t:t + 1], cache) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, expected, atol=1e-5, rtol=1e-5)


# ---- shapes, parameters, gradients --------------------------------------------------------------------------

@Q_LORA_RANKS
def test_shapes_and_layer_names(q_lora_rank):
    cfg = mla_config(q_lora_rank)
    attn = MultiHeadLatentAttention(cfg)
    assert attn(torch.randn(3, 5, cfg.d_model)).shape == (3, 5, cfg.d_model)
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters()}
    q_layers = ({"q_proj.weight": (4 * 10, 32)} if q_lora_rank is None else
                {"q_a_proj.weight": (16, 32), "q_a_layernorm.weight": (16,), "q_b_proj.weight": (4 * 10, 16)})
    assert shapes == {**q_layers,
                      "kv_a_proj_with_mqa.weight": (12 + 4, 32),  # [c_kv | k_rope]
                      "kv_a_layernorm.weight": (12,),
                      "kv_b_proj.weight": (4 * (6 + 10), 12),     # per head [k_nope | v]
                      "out.weight": (32, 4 * 10)}


def test_model_builds_mla_blocks_with_scaled_output_init():
    model = MiniLM(mla_config(16, n_layers=8, init_std=0.02))
    assert all(isinstance(blk.attn, MultiHeadLatentAttention) for blk in model.blocks)
    std = torch.cat([blk.attn.out.weight.flatten() for blk in model.blocks]).std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.1)


@Q_LORA_RANKS
def test_gradient_reaches_every_parameter(q_lora_rank):
    torch.manual_seed(0)
    model = MiniLM(mla_config(q_lora_rank))
    ids = torch.randint(0, 64, (2, 12))
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---- caching ------------------------------------------------------------------------------------------------

@Q_LORA_RANKS
def test_cached_generation_equals_uncached(q_lora_rank):
    torch.manual_seed(0)
    model = MiniLM(mla_config(q_lora_rank, init_std=0.3))  # larger weights: distinct logits, no near-ties
    prompt = torch.randint(0, 64, (2, 5))
    cached = model.generate(prompt, 12, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 12, use_cache=False))
    assert cached.shape == (2, 17)


@Q_LORA_RANKS
def test_chunked_prefill_equals_full_forward(q_lora_rank):
    """Chunks of 6 and 4 tokens (the second needs the offset mask), then single tokens."""
    torch.manual_seed(0)
    model = MiniLM(mla_config(q_lora_rank)).eval()
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids).logits
    cache = Cache(model, 2, 16)
    parts = [model(ids[:, a:b], cache=cache).logits for a, b in ((0, 6), (6, 10), (10, 11), (11, 12))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 12


def test_later_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = MiniLM(mla_config(16)).eval()
    ids = torch.randint(0, 64, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 64
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=0, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@Q_LORA_RANKS
def test_absorbed_path_equals_naive(q_lora_rank):
    """W_uk folded into the query and W_uv applied after attention, heads folded into the query rows of one
    key/value head: same numbers without a cache, token by token, and in chunks of T > 1 after a cached past."""
    torch.manual_seed(0)
    cfg = mla_config(q_lora_rank)
    attn = MultiHeadLatentAttention(cfg)
    x = torch.randn(2, 10, cfg.d_model)
    naive = attn(x)
    torch.testing.assert_close(attn.forward_absorbed(x), naive, atol=1e-5, rtol=1e-5)
    cache = attn.new_cache(2, 16, "cpu", torch.float32)
    parts = [attn.forward_absorbed(x[:, a:b], cache) for a, b in ((0, 4), (4, 7), (7, 8), (8, 9), (9, 10))]
    torch.testing.assert_close(torch.cat(parts, dim=1), naive, atol=1e-5, rtol=1e-5)


@Q_LORA_RANKS
def test_absorbed_path_has_the_same_gradients(q_lora_rank):
    """Same function, so the same gradients (for every parameter, W_ukv through its absorbed halves)."""
    torch.manual_seed(0)
    cfg = mla_config(q_lora_rank)
    attn = MultiHeadLatentAttention(cfg)
    x, w = torch.randn(2, 7, cfg.d_model), torch.randn(2, 7, cfg.d_model)
    grads = []
    for fn in (attn.forward, attn.forward_absorbed):
        attn.zero_grad()
        (fn(x) * w).sum().backward()
        grads.append({name: p.grad.clone() for name, p in attn.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


# ---- the cache holds only the latent ------------------------------------------------------------------------

CACHE_CONFIGS = {
    "mla": mla_config(16),
    "mha": ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32),
    "gqa": ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32),
}


@pytest.mark.parametrize("kind", CACHE_CONFIGS)
def test_cache_bytes_match_formula_and_real_tensors(kind):
    cfg = CACHE_CONFIGS[kind]
    model = MiniLM(cfg).eval()
    batch, T, max_len = 3, 7, 16
    cache = Cache(model, batch, max_len)
    model(torch.randint(0, 64, (batch, T)), cache=cache)
    expected = T * kv_cache_bytes_per_token(cfg) * batch
    assert cache.nbytes() == expected
    # every tensor a layer's cache holds has one max_len axis: count its filled T positions
    tensors = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    assert sum(t.numel() // max_len * T * t.element_size() for t in tensors) == expected
    if kind == "mla":
        assert all(isinstance(layer, LatentKVCache) for layer in cache.layers)
        assert {name for name, t in vars(cache.layers[0]).items() if isinstance(t, torch.Tensor)} == {"c_kv", "k_rope"}
        assert tuple(cache.layers[0].c_kv.shape) == (batch, max_len, cfg.kv_lora_rank)


def test_cache_bytes_follow_the_dtype():
    cfg = mla_config(None)
    model = MiniLM(cfg).to(torch.bfloat16).eval()
    cache = Cache(model, 2, 16)
    model(torch.randint(0, 64, (2, 5)), cache=cache)
    assert kv_cache_bytes_per_token(cfg, torch.bfloat16) * 2 == kv_cache_bytes_per_token(cfg)
    assert cache.nbytes() == 5 * 2 * kv_cache_bytes_per_token(cfg, torch.bfloat16)


def test_mla_cache_is_smaller_than_mha_and_gqa_at_default_sizes():
    mha, gqa, mla = ModelConfig(), ModelConfig(n_kv_heads=1), ModelConfig(attention="mla")
    # d_model=256, 4 layers, 4 heads of 64: MHA 2*4*4*64*4; GQA one KV head; MLA 4 * (64 + 32) * 4 bytes
    assert kv_cache_bytes_per_token(mha) == 8192
    assert kv_cache_bytes_per_token(gqa) == 2048
    assert kv_cache_bytes_per_token(mla) == 1536


def test_odd_rotary_dims_are_rejected():
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        ModelConfig(attention="mla", qk_rope_head_dim=3)
