import pytest
import torch

from minimoe import MiniLM, ModelConfig


def small(**kw):
    return ModelConfig(**{**dict(d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64), **kw})


def test_forward_shapes_and_aux_loss():
    model = MiniLM(small())
    out = model(torch.randint(0, 260, (3, 11)))
    assert out.logits.shape == (3, 11, 260) and out.logits.dtype == torch.float32
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    assert out.loss is None


def test_loss_matches_cross_entropy_and_starts_near_uniform():
    torch.manual_seed(0)
    model = MiniLM(small())
    x, y = torch.randint(0, 260, (4, 16)), torch.randint(0, 260, (4, 16))
    out = model(x, targets=y)
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 260), y.reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    assert abs(out.loss.item() - torch.log(torch.tensor(260.0)).item()) < 0.3  # small init -> near-uniform


def test_parameter_counts_follow_the_formula():
    cfg = small(d_model=64, n_heads=4, n_kv_heads=2, d_ff=160)
    hd = cfg.head_dim
    per_layer = 64 * (4 + 2 * 2) * hd + 4 * hd * 64 + 64 * 2 * 160 + 160 * 64 + 2 * 64
    for tied in (True, False):
        model = MiniLM(ModelConfig(**{**cfg.to_dict(), "tie_embeddings": tied}))
        expected = 260 * 64 * (1 if tied else 2) + cfg.n_layers * per_layer + 64
        assert model.num_parameters() == expected
        assert model.num_active_parameters() == expected  # dense: every parameter touches every token
        assert model.num_parameters(non_embedding=True) == expected - 260 * 64
    tied = MiniLM(cfg)
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()


def test_flops_per_token():
    cfg = small(d_model=64, n_heads=4, n_kv_heads=4, d_ff=128, n_layers=2)
    model = MiniLM(cfg)
    matmul = 2 * (64 * 3 * 64 + 64 * 64 + 64 * 256 + 128 * 64) + 64 * 260
    assert model.flops_per_token(32) == 6 * matmul + 12 * 2 * 4 * 16 * 32


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1, 2, 260]]), "outside the vocabulary"),
    (torch.tensor([[-1, 2]]), "outside the vocabulary"),
    (torch.zeros(1, 65, dtype=torch.long), "max_seq_len"),
    (torch.zeros(5, dtype=torch.long), "shape"),
    (torch.zeros(1, 4), "integer"),
    ([[1, 2]], "LongTensor"),
])
def test_bad_input_raises_clear_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        MiniLM(small())(bad)


@pytest.mark.parametrize("seed", range(4))
def test_cached_greedy_generation_equals_uncached(seed):
    torch.manual_seed(seed)
    model = MiniLM(small(n_kv_heads=1 if seed % 2 else 4))
    prompt = torch.randint(0, 256, (3, 7))
    cached = model.generate(prompt, 30, use_cache=True)
    uncached = model.generate(prompt, 30, use_cache=False)
    assert cached.shape == (3, 37)
    assert torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, uncached)


def test_sampling_is_seeded_and_filters():
    torch.manual_seed(0)
    model = MiniLM(small())
    prompt = torch.randint(0, 256, (2, 5))
    a = model.generate(prompt, 20, temperature=1.0, seed=3)
    b = model.generate(prompt, 20, temperature=1.0, seed=3)
    c = model.generate(prompt, 20, temperature=1.0, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # top_k=1 and a tiny top_p both reduce sampling to greedy
    greedy = model.generate(prompt, 20)
    assert torch.equal(model.generate(prompt, 20, temperature=1.0, top_k=1, seed=1), greedy)
    assert torch.equal(model.generate(prompt, 20, temperature=1.0, top_p=1e-6, seed=1), greedy)
    one_d = model.generate(prompt[0], 4)
    assert one_d.dim() == 1 and torch.equal(one_d, greedy[0, :9])


def test_top_k_only_emits_allowed_tokens():
    from minimoe.model import _sample
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    tokens = _sample(logits, 1.0, 2, None, g)
    assert set(tokens.tolist()) == {0, 1}
    tokens = _sample(logits, 1.0, None, 0.8, g)  # p(0)=0.66, p(0)+p(1)=0.9 -> nucleus {0, 1}
    assert set(tokens.tolist()) == {0, 1}


def test_generate_stops_at_eos_and_validates_arguments():
    torch.manual_seed(0)
    model = MiniLM(small())
    prompt = torch.randint(0, 256, (1, 4))
    first = model.generate(prompt, 1)[0, -1].item()
    out = model.generate(prompt, 10, eos_id=first)
    assert out.shape[1] == 5 and out[0, -1].item() == first
    for kwargs, match in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
                          (dict(top_k=0), "top_k"), (dict(top_p=1.5), "top_p"),
                          (dict(max_new_tokens=100), "max_seq_len")]:
        with pytest.raises(ValueError, match=match):
            model.generate(prompt, **{"max_new_tokens": 3, **kwargs})
    assert model.training  # generate restores the training flag


def test_training_step_reduces_loss_and_all_parameters_get_gradients():
    torch.manual_seed(0)
    model = MiniLM(small())
    x = torch.randint(0, 260, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(x[:, :-1], targets=x[:, 1:]).loss
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # memorising one batch


def test_cache_longer_than_the_rotary_table_is_rejected(tiny_config):
    from minimoe.model import Cache
    model = MiniLM(tiny_config)
    with pytest.raises(ValueError, match="max_seq_len"):
        Cache(model, 1, tiny_config.max_seq_len + 1)
