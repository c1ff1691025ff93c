"""Quantization (minimoe.quant): round-to-nearest against torch's fake_quantize, the packed storage, torch's
packed kernels against the dequantize-then-matmul reference, GPTQ against RTN, whole models, checkpoints and
their bytes, bad input, and the `minimoe quantize` command.

Models are 2 layers x 32-64 wide; nothing here is timed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_checkpoint import crash_sweep, which

from minimoe import MiniLM, ModelConfig
from minimoe.checkpoint import MANIFEST, CheckpointError, _sha256, save_checkpoint
from minimoe.moe import GroupedExperts
from minimoe.quant import (Hessian, QuantExperts, QuantLinear, Quantizer, Scheme, gptq_quantize, is_quantized,
                           layer_error, load_quantized, moe_policy, pack_int4, quantize, quantize_activations,
                           quantize_rtn, save_quantized, set_kernel, stored_bytes, unpack_int4)
from minimoe.quant.bench import ao_dynamic_int8, compression, decode_speed, lm_metrics

SCHEMES = [Scheme(8, None), Scheme(8, None, symmetric=False), Scheme(4, 32), Scheme(4, 64, symmetric=False),
           Scheme(4, 128), Scheme(4, None)]


def dense(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(d_model=64, n_layers=2, n_heads=2, max_seq_len=32), **kw})


def moe(**kw) -> ModelConfig:
    return dense(n_experts=4, top_k=2, moe_d_ff=32, n_shared_experts=1, router="deepseek", first_dense_layers=1,
                 **kw)


def trained_like(config: ModelConfig, seed: int = 0) -> MiniLM:
    """A model whose weights have std 1 / sqrt(d_model), so logits are O(1) (the 0.02 init leaves them near 0,
    which would hide any error)."""
    torch.manual_seed(seed)
    model = MiniLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, config.d_model ** -0.5)
    return model


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ---- round to nearest ----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_rtn_equals_torch_fake_quantize(scheme):
    """Given our scales and zero points, our codes are exactly torch's fake_quantize_per_channel_affine."""
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    qw = quantize_rtn(w, scheme)
    g = qw.group_size
    zero = qw.zero.int().flatten() if qw.zero is not None else torch.zeros(qw.scale.numel(), dtype=torch.int32)
    torch_deq = torch.fake_quantize_per_channel_affine(
        w.view(-1, g), qw.scale.float().flatten(), zero, 0, -(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1)
    assert torch.equal(qw.dequantize(), torch_deq.view_as(w))


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_rtn_round_trip_error_bound(scheme):
    torch.manual_seed(1)
    w = torch.randn(32, 256)
    w[3, 17] = 40.0  # an outlier only moves its own group's scale
    qw = quantize_rtn(w, scheme)
    step = qw.scale.float().repeat_interleave(qw.group_size, dim=1)[:, :256]
    err = (qw.dequantize() - w).abs()
    # asymmetric: the integer zero point shifts the grid by up to half a step, so the ends of [min, max] can
    # fall up to half a step outside it and be clamped: one step in all (as with torch's MinMax observers)
    half_steps = 1 if scheme.symmetric else 2
    assert bool((err <= step / 2 * half_steps * (1 + 1e-3) + 1e-7).all())
    qmax = 2 ** (scheme.bits - 1) - 1
    if scheme.symmetric:  # s = max|w| / qmax, rounded to fp16
        expect = w.view(32, -1, qw.group_size).abs().amax(-1) / qmax
        assert torch.allclose(qw.scale.float(), expect, rtol=1e-3)
    # mean error shrinks with the bits: about a step / sqrt(12)
    bound = {8: 0.01, 4: 0.2}[scheme.bits]
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[3] = False
    assert rel_err(qw.dequantize()[mask], w[mask]) < bound


def test_zero_is_exact_and_all_zero_groups_survive():
    w = torch.zeros(4, 64)
    w[0, :32] = torch.linspace(-1, 3, 32)
    for scheme in (Scheme(4, 32), Scheme(4, 32, symmetric=False), Scheme(8, None, symmetric=False)):
        deq = quantize_rtn(w, scheme).dequantize()
        assert torch.equal(deq[1:], w[1:]) and torch.equal(deq[0, 32:], w[0, 32:])


def test_short_last_group_is_the_zero_padded_row():
    """The documented rule: 96 inputs with group 64 = groups of 64 and 32, as if padded with zeros to 128."""
    torch.manual_seed(2)
    w = torch.randn(16, 96)
    for sym in (True, False):
        qw = quantize_rtn(w, Scheme(4, 64, symmetric=sym))
        assert qw.scale.shape == (16, 2) and qw.codes.shape == (16, 48)
        padded = quantize_rtn(torch.cat([w, torch.zeros(16, 32)], 1), Scheme(4, 64, symmetric=sym))
        assert torch.equal(qw.dequantize(), padded.dequantize()[:, :96])
    # a row shorter than the group is one group
    assert quantize_rtn(torch.randn(8, 64), Scheme(4, 128)).scale.shape == (8, 1)


def test_int4_packing_layout_and_round_trip():
    q = torch.tensor([[-8, 7, 0, 1]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0 | 15 << 4, 8 | 9 << 4]]  # even index: low nibble
    allq = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(allq)), allq)


def test_bits_per_weight():
    assert Scheme(4, 128).bits_per_weight(256) == 4 + 16 / 128
    assert Scheme(4, 128, symmetric=False).bits_per_weight(256) == 4 + 24 / 128
    assert Scheme(8, None).bits_per_weight(384) == 8 + 16 / 384
    assert Scheme(4, 128).bits_per_weight(704) == 4 + 6 * 16 / 704  # five groups of 128 and one of 64
    assert 16 / Scheme(4, 128).bits_per_weight(4096) == pytest.approx(3.879, abs=1e-3)


# ---- kernels against the reference ---------------------------------------------------------------

KERNEL_CASES = [  # (scheme, in, out, the kernel that must run on a CPU)
    (Scheme(4, 128), 256, 96, "_weight_int4pack_mm_for_cpu"),
    (Scheme(4, 32, symmetric=False), 64, 32, "_weight_int4pack_mm_for_cpu"),
    (Scheme(4, 64), 96, 48, "_weight_int4pack_mm_for_cpu"),        # short last group: padded for the kernel
    (Scheme(4, 128, activation_quant=True), 256, 64, "_weight_int4pack_mm_for_cpu"),
    (Scheme(8, None), 64, 48, "_weight_int8pack_mm"),
    (Scheme(8, None, symmetric=False), 64, 48, "_weight_int8pack_mm"),
    (Scheme(8, None, activation_quant=True), 64, 40, "_int_mm"),
    (Scheme(8, None, symmetric=False, activation_quant=True), 96, 48, "_int_mm"),
]


@pytest.mark.parametrize("scheme,n_in,n_out,kernel", KERNEL_CASES, ids=lambda v: str(v))
def test_cpu_kernels_match_the_reference(scheme, n_in, n_out, kernel):
    torch.manual_seed(3)
    layer = QuantLinear.from_weight(torch.randn(n_out, n_in) * 0.1, scheme, bias=torch.randn(n_out))
    for shape in ((1, n_in), (5, n_in), (2, 3, n_in)):
        x = torch.randn(*shape)
        assert layer.kernel_path(x.reshape(-1, n_in)) == kernel  # the fast path really runs
        fast = layer(x)
        layer.kernel = "reference"
        ref = layer(x)
        layer.kernel = "auto"
        assert fast.shape == ref.shape == (*shape[:-1], n_out) and fast.dtype == x.dtype
        # bf16 activations in the weight-only kernels; integer accumulation for _int_mm
        tol = 2e-5 if kernel == "_int_mm" else 1.5e-2
        assert rel_err(fast, ref) < tol, rel_err(fast, ref)


def test_kernel_falls_back_where_torch_has_none():
    layer = QuantLinear.from_weight(torch.randn(8, 64), Scheme(4, 64))  # int4 kernel needs out % 16 == 0
    assert layer.kernel_path(torch.randn(1, 64)) == "reference"
    layer = QuantLinear.from_weight(torch.randn(16, 64), Scheme(8, 32))  # group-wise int8: no kernel
    assert layer.kernel_path(torch.randn(1, 64)) == "reference"
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ layer.dequantize().T, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("scheme", [Scheme(4, 128), Scheme(4, 64, symmetric=False), Scheme(8, None),
                                    Scheme(8, None, activation_quant=True)], ids=str)
def test_cuda_kernels_match_the_reference(scheme):
    torch.manual_seed(4)
    layer = QuantLinear.from_weight(torch.randn(128, 256, device="cuda") * 0.1, scheme)
    x = torch.randn(32, 256, device="cuda")
    fast = layer(x)
    layer.kernel = "reference"
    assert rel_err(fast, layer(x)) < 1.5e-2


def test_w8a8_against_torch_ao_dynamic_int8():
    """Outside reference: torch.ao's dynamic int8 Linear (per-tensor activations) and ours (per token) land
    equally close to the float layer."""
    torch.manual_seed(5)
    lin = nn.Linear(128, 64, bias=False)
    x = torch.randn(16, 128) * torch.rand(16, 1) * 4  # rows of different scales
    ours = QuantLinear.from_weight(lin.weight, Scheme(8, None, activation_quant=True))
    # ao_dynamic_int8 picks layers by their MiniLM names: one attention projection in a model-like tree
    tree = nn.ModuleDict({"blocks": nn.ModuleDict({"0": nn.ModuleDict({"attn": nn.ModuleDict({"q": lin})})})})
    ao_lin = ao_dynamic_int8(tree).blocks["0"].attn.q
    assert "quantized.dynamic" in type(ao_lin).__module__
    exact = lin(x)
    assert rel_err(ours(x), exact) < 0.02
    assert rel_err(ours(x), exact) <= 1.5 * rel_err(ao_lin(x), exact)


def test_quantize_activations_per_token():
    x = torch.tensor([[0.5, -1.0, 0.25], [100.0, 50.0, -25.0]])
    q, s = quantize_activations(x)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert torch.allclose(s[:, 0], torch.tensor([1 / 127, 100 / 127]))
    assert torch.allclose(q.float() * s, x, rtol=0.01)


# ---- GPTQ ------------------------------------------------------------------------------------------

def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs near an 8-dimensional subspace (fixed), as a layer's activations are; `seed` draws the samples."""
    basis = torch.randn(8, d, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g) @ basis + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("scheme", [Scheme(4, 32), Scheme(4, None, symmetric=False), Scheme(8, None)], ids=str)
def test_gptq_beats_rtn_on_its_objective(scheme):
    torch.manual_seed(6)
    W = torch.randn(32, 128)
    X = correlated_inputs(512, 128)
    h = Hessian(128)
    h.add(X[:256])
    h.add(X[256:])
    H = h.value()
    assert torch.allclose(H, 2 * X.T @ X / 512, rtol=1e-4, atol=1e-3)
    gptq, rtn = gptq_quantize(W, H, scheme), quantize_rtn(W, scheme)
    assert layer_error(W, gptq, H) < 0.7 * layer_error(W, rtn, H)
    # and on fresh samples from the same distribution
    Xt = correlated_inputs(512, 128, seed=1)
    assert rel_err(Xt @ gptq.dequantize().T, Xt @ W.T) < rel_err(Xt @ rtn.dequantize().T, Xt @ W.T)


def test_gptq_with_an_identity_hessian_is_rtn():
    """With H = I no column's error can be compensated by another: GPTQ must reduce to round-to-nearest."""
    torch.manual_seed(7)
    W = torch.randn(16, 96)
    for scheme in (Scheme(4, 32), Scheme(4, 64, symmetric=False), Scheme(8, None)):
        a, b = gptq_quantize(W, torch.eye(96), scheme), quantize_rtn(W, scheme)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


# ---- whole models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,bound", [(dict(bits=8), 0.05), (dict(bits=4, group_size=32), 0.5),
                                      (dict(bits=4, group_size=32, method="gptq"), 0.5),
                                      (dict(bits=4, activation_quant=True), 0.6)], ids=str)
def test_quantize_dense_model(kw, bound):
    model = trained_like(dense())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 256, (2, 16))
    calibration = torch.randint(0, 256, (16, 32))
    q = quantize(model, **kw, calibration=calibration)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy: the original is intact
    assert not is_quantized(model) and is_quantized(q)
    kinds = {n: type(m).__name__ for n, m in q.named_modules()}
    assert kinds["blocks.0.attn.qkv"] == kinds["blocks.1.mlp.down"] == "QuantLinear"
    assert isinstance(q.embed, nn.Embedding) and q.lm_head.weight is q.embed.weight  # kept, still tied
    fast = q(x).logits
    assert rel_err(fast, model(x).logits) < bound
    # kernels differ from the reference only by bf16 rounding in every layer (each held to 1.5e-2 above),
    # which this random model's layers amplify
    assert rel_err(fast, set_kernel(q, "reference")(x).logits) < 0.06


def test_quantize_moe_model_with_a_policy():
    model = trained_like(moe())
    q = quantize(model, 4, policy=moe_policy(group_size=32))
    layer = q.blocks[1].mlp
    assert isinstance(layer.experts, QuantExperts) and isinstance(layer.router.gate, nn.Linear)
    assert layer.experts.gate_up[0].scheme.bits == 4 and layer.experts.gate_up[0].group_size == 32
    assert q.blocks[1].attn.qkv.scheme.bits == 8 and layer.shared.down.scheme.bits == 8
    assert q.blocks[0].mlp.gate_up.scheme.bits == 8  # the dense first layer
    x = torch.randint(0, 256, (2, 16))
    assert rel_err(q(x).logits, model(x).logits) < 0.2
    assert q.num_active_parameters() > 0  # reads the experts' weights through QuantExperts' float views


@pytest.mark.parametrize("weighted", [False, True])
def test_quant_experts_equal_grouped_experts_with_the_dequantized_weights(weighted):
    torch.manual_seed(8)
    ref = GroupedExperts(4, 64, 32)
    with torch.no_grad():
        ref.w_gate_up.normal_(0, 0.2)
        ref.w_down.normal_(0, 0.2)
    q = QuantExperts(4, 64, 32, Scheme(4, 32))
    for e in range(4):
        q.gate_up[e].load_quantized(quantize_rtn(ref.w_gate_up[e].T, Scheme(4, 32)))
        q.down[e].load_quantized(quantize_rtn(ref.w_down[e].T, Scheme(4, 32)))
    deq = GroupedExperts(4, 64, 32)
    with torch.no_grad():
        deq.w_gate_up.copy_(q.w_gate_up)
        deq.w_down.copy_(q.w_down)
    counts = [3, 0, 5, 2]
    x = torch.randn(10, 64)
    w = torch.rand(10) if weighted else None
    set_kernel(q, "reference")
    assert torch.allclose(q(x, counts, w), deq.loop_forward(x, counts, w), atol=1e-4)
    set_kernel(q, "auto")
    assert rel_err(q(x, counts, w), deq.loop_forward(x, counts, w)) < 1.5e-2


def test_gptq_on_an_moe_model_uses_each_experts_tokens():
    """Calibrated on the very tokens it is then run on, GPTQ's layer-by-layer error compensation must bring the
    logits closer to the float model's than round to nearest does."""
    model = trained_like(moe())
    x = torch.randint(0, 256, (4, 32))
    rtn = quantize(model, 4, group_size=32)
    gptq = quantize(model, 4, group_size=32, method="gptq", calibration=x)
    assert isinstance(gptq.blocks[1].mlp.experts, QuantExperts)
    exact = model(x).logits
    assert rel_err(gptq(x).logits, exact) < 0.9 * rel_err(rtn(x).logits, exact)


def test_quantizer_mirrors_the_article_listing():
    model = trained_like(dense(d_model=128, n_heads=4))
    quantizer = Quantizer(bits=4, group_size=128, activation_quant=True)
    assert "bits=4" in repr(quantizer) and "activation_quant=True" in repr(quantizer)
    a, b = quantizer.quantize(model), quantize(model, 4, 128, activation_quant=True)
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(a(x).logits, b(x).logits)
    assert a.blocks[0].attn.qkv.scheme == Scheme(4, 128, activation_quant=True)


# ---- checkpoints and bytes -------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(bits=4, group_size=128), dict(bits=4, group_size=64, symmetric=False),
                                dict(bits=8), dict(bits=4, policy=moe_policy(group_size=32))], ids=str)
def test_save_and_load_round_trip_and_bytes(tmp_path, kw):
    config = moe(d_model=128, n_heads=4) if "policy" in kw else dense(d_model=128, n_heads=4, d_ff=384)
    model = trained_like(config)
    q = quantize(model, **kw)
    path = save_quantized(q, tmp_path / "q")
    loaded = load_quantized(path)
    x = torch.randint(0, 256, (2, 12))
    assert torch.equal(loaded(x).logits, q(x).logits)
    # every quantized layer's stored bytes are exactly its bits per weight
    sizes = stored_bytes(path)
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            stored = sum(b for k, b in sizes.items() if k.startswith(name + "."))
            assert 8 * stored == m.scheme.bits_per_weight(m.in_features) * m.in_features * m.out_features
    c = compression(q)
    on_disk = (path / "model.safetensors").stat().st_size
    assert c["file_bytes"] == on_disk and sum(sizes.values()) <= on_disk < sum(sizes.values()) + 20_000
    if kw.get("group_size") == 128:
        assert c["bits_per_weight"] == 4.125 and c["weights_vs_fp16"] == pytest.approx(16 / 4.125)


def _rewrite_manifest(path: Path) -> None:
    files = sorted(p.name for p in path.iterdir() if p.name != MANIFEST)
    (path / MANIFEST).write_text(json.dumps({n: {"bytes": (path / n).stat().st_size, "sha256": _sha256(path / n)}
                                             for n in files}))


def test_a_quantized_save_killed_at_any_point_leaves_the_old_or_the_new(tmp_path):
    """save_quantized writes through minimoe.checkpoint's atomic_folder, so it has its guarantee: after a crash
    at any filesystem operation of an overwrite, load_quantized gives the old checkpoint or the new one."""
    old = quantize(trained_like(dense(), seed=0), 4, group_size=32)
    new = quantize(trained_like(dense(), seed=1), 4, group_size=32)
    runs = crash_sweep(lambda k: save_quantized(old, tmp_path / str(k) / "q"), lambda p: save_quantized(new, p),
                       lambda p: which(load_quantized(p), old=old, new=new))
    outcomes = [got for _, got, _ in runs]
    assert len(runs) > 10 and outcomes[0] == "old" and outcomes[-1] == "new"
    assert None not in outcomes
    assert outcomes == sorted(outcomes, key=["old", "new"].index)  # never nothing, never back to the old


def test_quantize_and_load_leave_the_callers_random_state_alone(tmp_path):
    """quantize() and load_quantized() build a fresh MiniLM, whose random init must not shift what the caller's
    next torch.rand (or dropout mask) would have been."""
    model, moe_model = trained_like(dense()), trained_like(moe())
    calibration = torch.randint(0, 256, (8, 32))
    path = save_quantized(quantize(model, 4, group_size=32), tmp_path / "q")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(before)
    quantize(model, 8)
    quantize(model, 4, group_size=32, method="gptq", calibration=calibration)
    quantize(moe_model, 4, policy=moe_policy(group_size=32, method="gptq"), calibration=calibration)
    load_quantized(path)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(4), expected)


def test_checkpoint_whose_packed_tensors_do_not_match_its_config(tmp_path):
    model = trained_like(dense())
    a = save_quantized(quantize(model, 4, group_size=32), tmp_path / "a")
    b = save_quantized(quantize(model, 4, group_size=64), tmp_path / "b")
    shutil.copy(b / "model.safetensors", a / "model.safetensors")  # scales of group 64 under a group-32 config
    _rewrite_manifest(a)
    with pytest.raises(ValueError, match=r"scale is float16 \[.*\], but config.json"):
        load_quantized(a)
    info = json.loads((b / "quantization.json").read_text())
    info["layers"]["blocks.0.attn.qkv"]["bits"] = 8
    (b / "quantization.json").write_text(json.dumps(info))
    _rewrite_manifest(b)
    with pytest.raises(ValueError, match="codes"):
        load_quantized(b)
    info["layers"]["blocks.0.attn.qkv"]["in_features"] = 32
    (b / "quantization.json").write_text(json.dumps(info))
    _rewrite_manifest(b)
    with pytest.raises(ValueError, match="does not match config.json at layer 'blocks.0.attn.qkv'"):
        load_quantized(b)
    plain = save_checkpoint(tmp_path / "plain", model)
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        load_quantized(plain)


# ---- bad input -------------------------------------------------------------------------------------

def test_bad_input_is_a_value_error_with_the_reason():
    model = trained_like(dense())
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize(model, 3)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        Quantizer(bits=16)
    with pytest.raises(ValueError, match="per output channel"):
        quantize(model, 8, group_size=64)
    with pytest.raises(ValueError, match="group_size must be an integer"):
        quantize(model, 4, group_size=0)
    with pytest.raises(ValueError, match="method must be"):
        quantize(model, 4, method="awq")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(model, 8), 4)
    with pytest.raises(ValueError, match="not a layer kind"):
        quantize(model, 4, policy={"attn": None})
    with pytest.raises(ValueError, match="kernel must be"):
        quantize(model, 4, kernel="fast")
    with pytest.raises(ValueError, match="even number of input features"):
        quantize_rtn(torch.randn(4, 33), Scheme(4, None))
    with pytest.raises(ValueError, match="needs a quantized model"):
        save_quantized(model, "/tmp/never-written")


# ---- measurements ------------------------------------------------------------------------------------

def test_lm_metrics_agrees_with_train_evaluate(tiny_data):
    from minimoe.train import evaluate
    _, val = tiny_data
    model = trained_like(dense(d_model=32))
    ours, theirs = lm_metrics(model, val, batch_size=4, seq_len=32, max_batches=3), \
        evaluate(model, val, batch_size=4, seq_len=32, max_batches=3)
    assert ours["bpb"] == pytest.approx(theirs["bpb"], rel=1e-6) and 0 <= ours["accuracy"] <= 1


def test_decode_speed_reports_ratios_for_every_model():
    model = trained_like(dense(max_seq_len=64))
    rows = decode_speed({"fp32": model, "int8": quantize(model, 8)}, prompt_len=8, new_tokens=4, rounds=2)
    assert [r["scheme"] for r in rows] == ["fp32", "int8"] and rows[0]["speedup"] == 1.0
    assert all(r["matches_generate"] and r["decode_tokens_per_s"] > 0 and r["speedup_min"] <= r["speedup"]
               <= r["speedup_max"] for r in rows)


# ---- the command line --------------------------------------------------------------------------------

def test_cli_quantize(tmp_path, capsys):
    from minimoe.cli import main
    ckpt = save_checkpoint(tmp_path / "m", trained_like(dense(d_model=128, n_heads=4, d_ff=256)))
    assert main(["quantize", str(ckpt), "--out", str(tmp_path / "q"), "--bits", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "4.125 bits per weight" in out and "3.88x smaller than fp16" in out
    assert is_quantized(load_quantized(tmp_path / "q"))
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(ckpt), "--out", str(tmp_path / "r"), "--bits", "3"])
    assert e.value.code == 2
    assert main(["quantize", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "neither a checkpoint folder nor a zoo model" in capsys.readouterr().err


def test_forward_follows_kernel_changes_and_loaded_weights():
    """forward() plans its kernel once; switching to the reference or loading new codes must re-plan."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(2, 128)
    layer = QuantLinear.from_weight(w, Scheme(4, 128))
    fast = layer(x)
    layer.kernel = "reference"
    ref = layer(x)
    assert torch.equal(ref, layer.reference_forward(x)) and not torch.equal(fast, ref)
    other = QuantLinear.from_weight(torch.randn(64, 128), Scheme(4, 128))
    layer.kernel = "auto"
    layer(x)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x))
