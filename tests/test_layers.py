import pytest
import torch
import torch.nn.functional as F

from minimoe.layers import RMSNorm, Rotary, SwiGLU


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    ours, ref = RMSNorm(48, eps=1e-5), torch.nn.RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 48) * 4
    torch.testing.assert_close(ours(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x), atol=3e-2, rtol=3e-2)


def test_rmsnorm_before_weight_rounds_like_transformers():
    """In bf16, rounding="before_weight" is transformers' RMSNorm bit for bit (Llama, Mixtral, Qwen3 and
    DeepSeek-V3 share the formula); the default rounds once, which differs in many elements."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 48, generator=g) * 3).bfloat16()
    w = (1.0 + 0.2 * torch.randn(48, generator=g)).bfloat16()
    ours, once = RMSNorm(48, 1e-6, rounding="before_weight").bfloat16(), RMSNorm(48, 1e-6).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(w)
        once.weight.copy_(w)
        for cls in (LlamaRMSNorm, DeepseekV3RMSNorm):
            ref = cls(48, eps=1e-6).bfloat16()
            ref.weight.copy_(w)
            assert torch.equal(ours(x), ref(x)), cls.__name__
        assert torch.equal(once(x), F.rms_norm(x.float(), (48,), w.float(), 1e-6).bfloat16())
        assert (once(x) != ref(x)).float().mean() > 0.05  # one rounding instead of two: another bf16 result
        x32 = x.float()
        torch.testing.assert_close(ours.float()(x32), once.float()(x32), rtol=1e-6, atol=1e-6)  # fp32: the same


def test_rmsnorm_rounding_is_validated():
    with pytest.raises(ValueError, match="rounding"):
        RMSNorm(8, rounding="twice")
    norm = RMSNorm(8)
    with pytest.raises(ValueError, match="rounding"):
        norm.rounding = "fp32"
    assert norm.rounding == "once" and "rounding='once'" in repr(norm)


def test_rotary_preserves_norm_and_encodes_relative_position():
    rot = Rotary(head_dim=16, max_seq_len=64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    # rotating a vector never changes its length
    x = torch.randn(2, 3, 10, 16)
    torch.testing.assert_close(rot(x).norm(dim=-1), x.norm(dim=-1))

    def score(m, n):  # <R_m q, R_n k> depends only on m - n
        return (rot(q, start=m) * rot(k, start=n)).sum()
    torch.testing.assert_close(score(5, 2), score(40, 37), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4))
    # position 0 is the identity
    torch.testing.assert_close(rot(q, start=0), q)


def test_rotary_matches_complex_multiplication():
    """The rotate-half layout pairs dimension i with i + d/2; as complex numbers that is a rotation by pos * freq_i."""
    d, pos = 8, 7
    rot = Rotary(d, 16)
    x = torch.randn(1, 1, 1, d)  # [batch, seq, heads, head_dim]
    freqs = 10000.0 ** (-torch.arange(0, d, 2).double() / d)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.exp(1j * pos * freqs)
    expected = torch.cat([z.real, z.imag], dim=-1).float()
    torch.testing.assert_close(rot(x, start=pos), expected, atol=1e-5, rtol=1e-5)


def test_rotary_matches_textbook_formula_and_gradients():
    """The fused rotation equals  x * cos + rotate_half(x) * sin  in value and in gradient."""
    torch.manual_seed(0)
    rot = Rotary(head_dim=8, max_seq_len=32)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)   # [batch, seq, heads, head_dim]

    def textbook(x, start):
        ang = torch.outer(torch.arange(start, start + 5, dtype=torch.float64), 10000.0 ** (-torch.arange(0, 8, 2) / 8))
        cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    rot.cos, rot.sin = rot.cos.double(), rot.sin.double()  # float64 tables for gradcheck
    torch.testing.assert_close(rot(x, start=3), textbook(x, 3))
    assert torch.autograd.gradcheck(lambda t: rot(t, start=3), (x,))


def test_swiglu_formula():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 16)
    x = torch.randn(4, 8)
    W = mlp.gate_up.weight
    expected = (torch.nn.functional.silu(x @ W[:16].T) * (x @ W[16:].T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)
