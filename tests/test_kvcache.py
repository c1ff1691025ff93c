"""Decode-time accounting (minimoe.kvcache) and MLA's absorbed form at decode time."""
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minimoe import MiniLM, ModelConfig
from minimoe.attention import CausalSelfAttention, MultiHeadLatentAttention, kv_cache_bytes_per_token
from minimoe.kvcache import (absorbed_attention, cache_bytes_read_per_step, decode_step_flops,
                             read_bandwidth, time_decode_step, time_generate, time_model_step)

KINDS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mla": dict(attention="mla", kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10),
    "mla_q": dict(attention="mla", q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4,
                  v_head_dim=10),
}


def config(kind: str) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=48, **KINDS[kind])


def layer(cfg: ModelConfig):
    torch.manual_seed(0)
    cls = MultiHeadLatentAttention if cfg.attention == "mla" else CausalSelfAttention
    return cls(cfg).eval()


def counted_flops(step, attn, past: int, batch: int = 2) -> int:
    """FLOPs FlopCounterMode sees in one decode step; SDPA's math backend, whose matmuls the counter can see."""
    cache = attn.new_cache(batch, past + 1, "cpu", torch.float32)
    cache.length = past
    x = torch.randn(batch, 1, attn.out.out_features)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step(x, cache)
    return counter.get_total_flops() // batch


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("past", [0, 7])
def test_decode_step_flops_match_flop_counter(kind, past):
    cfg = config(kind)
    attn = layer(cfg)
    assert counted_flops(attn.forward, attn, past) == decode_step_flops(cfg, past)
    if cfg.attention == "mla":
        assert counted_flops(attn.forward_absorbed, attn, past) == decode_step_flops(cfg, past, absorbed=True)


def test_decode_step_flops_rejects_bad_arguments():
    with pytest.raises(ValueError, match="past"):
        decode_step_flops(config("mha"), -1)
    with pytest.raises(ValueError, match="absorbed"):
        decode_step_flops(config("gqa"), 4, absorbed=True)


def test_naive_mla_step_grows_faster_than_absorbed():
    # naive re-expands every cached latent: its per-position cost is kv_lora_rank * n_heads * (nope + v)
    cfg = config("mla")
    naive = decode_step_flops(cfg, 101) - decode_step_flops(cfg, 100)
    absorbed = decode_step_flops(cfg, 101, absorbed=True) - decode_step_flops(cfg, 100, absorbed=True)
    H, r = cfg.n_heads, cfg.kv_lora_rank
    assert naive == 2 * (r * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
                         + H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim))
    assert absorbed == 2 * H * (2 * r + cfg.qk_rope_head_dim)


@pytest.mark.parametrize("kind", list(KINDS))
def test_cache_bytes_read_per_step(kind):
    cfg = config(kind)
    for dtype in (torch.float32, torch.bfloat16):
        per_layer = kv_cache_bytes_per_token(cfg, dtype) // cfg.n_layers
        assert cache_bytes_read_per_step(cfg, 9, dtype) == 10 * per_layer


@pytest.mark.parametrize("kind", ["mla", "mla_q"])
def test_forward_absorbed_matches_forward(kind):
    cfg = config(kind)
    attn = layer(cfg)
    x = torch.randn(2, 11, cfg.d_model)
    with torch.no_grad():
        expected = attn(x)
        torch.testing.assert_close(attn.forward_absorbed(x), expected, atol=1e-5, rtol=1e-5)  # causal, no cache
        cache = attn.new_cache(2, 16, "cpu", torch.float32)  # prefill 4, a chunk of 3 after a past, then steps
        chunks = [attn.forward_absorbed(x[:, :4], cache), attn.forward_absorbed(x[:, 4:7], cache)]
        chunks += [attn.forward_absorbed(x[:, t:t + 1], cache) for t in range(7, 11)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), expected, atol=1e-5, rtol=1e-5)
        assert cache.length == 11


def test_forward_absorbed_reads_one_unexpanded_key_value_head():
    """The heads are folded into query rows: SDPA sees one key/value head, the cached latent itself."""
    cfg = config("mla")
    attn = layer(cfg)
    cache = attn.new_cache(2, 16, "cpu", torch.float32)
    cache.length = 9
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape, k.shape, v.shape, v.stride()))
        return sdpa(q, k, v, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        attn.forward_absorbed(torch.randn(2, 3, cfg.d_model), cache)
    H, r, rope = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    (q_shape, k_shape, v_shape, v_stride), = seen
    assert (q_shape, k_shape, v_shape) == ((2, 1, H * 3, r + rope), (2, 1, 12, r + rope), (2, 1, 12, r))
    assert 0 not in v_stride  # no stride-0 expansion to n_heads


def test_forward_absorbed_dropout_in_training_mode():
    """Dropout on the attention weights, as in `forward`: random in training, off in eval mode."""
    cfg = dataclasses.replace(config("mla"), dropout=0.5)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(cfg)
    x = torch.randn(2, 6, cfg.d_model)
    with torch.no_grad():
        attn.eval()
        torch.testing.assert_close(attn.forward_absorbed(x), attn(x), atol=1e-5, rtol=1e-5)
        attn.train()
        a, b = attn.forward_absorbed(x), attn.forward_absorbed(x)
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_absorbed_attention_generates_the_same_tokens_and_restores_forward():
    torch.manual_seed(0)
    model = MiniLM(config("mla_q")).eval()
    prompt = torch.randint(0, 64, (2, 6))
    expected = model.generate(prompt, 10)
    with torch.no_grad():
        logits = model(prompt).logits
    with absorbed_attention(model) as n:
        assert n == model.config.n_layers
        assert all(blk.attn.forward == blk.attn.forward_absorbed for blk in model.blocks)
        assert torch.equal(model.generate(prompt, 10), expected)
        with torch.no_grad():
            torch.testing.assert_close(model(prompt).logits, logits, atol=1e-5, rtol=1e-5)
    assert all("forward" not in vars(blk.attn) for blk in model.blocks)


def test_absorbed_attention_is_a_no_op_without_mla():
    model = MiniLM(config("gqa"))
    with absorbed_attention(model) as n:
        assert n == 0


def test_time_decode_step_and_generate():
    attn = layer(config("mla"))
    result = time_decode_step(attn, batch=2, past=20, repeats=3)
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["max_ms"]
    result = time_decode_step(attn, batch=2, past=20, step=attn.forward_absorbed, repeats=1)
    assert result["median_ms"] > 0
    with pytest.raises(ValueError, match="max_seq_len"):
        time_decode_step(attn, batch=1, past=48)  # config("mla") has max_seq_len 48: 49 positions do not fit
    with pytest.raises(TypeError, match="attention layer"):
        time_decode_step(torch.nn.Linear(4, 4), batch=1, past=3)
    model = MiniLM(config("mha"))
    timing = time_generate(model, torch.randint(0, 64, (2, 10)), new_tokens=5, repeats=2)
    assert len(timing["times_s"]) == 2
    assert timing["tokens_per_s"] == pytest.approx(2 * 5 / timing["median_s"])
    assert 0 < timing["prefill_s"] and timing["decode_ms_per_step"] >= 0
    with pytest.raises(ValueError, match="new_tokens"):
        time_generate(model, torch.randint(0, 64, (2, 10)), new_tokens=1)


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_time_model_step_leaves_a_usable_model(kind):
    model = MiniLM(config(kind)).eval()
    result = time_model_step(model, batch=2, past=30, repeats=2)
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["max_ms"]
    with absorbed_attention(model):
        assert time_model_step(model, batch=2, past=30, repeats=1)["median_ms"] > 0
    with pytest.raises(ValueError, match="max_seq_len"):
        time_model_step(model, batch=1, past=48)


def test_read_bandwidth_and_device_name():
    from minimoe.device import device_name
    assert read_bandwidth("cpu", mbytes=4, repeats=2) > 1e6  # any machine reads more than 1 MB/s
    label = device_name("cpu")
    assert isinstance(label, str) and "thread" in label
