"""The training loop: learning, history, exact resume, accumulation, LR schedules, bf16, validation, evaluate()."""
from __future__ import annotations

import dataclasses
import math
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_checkpoint import as_old_checkpoint

import minimoe.device as device_lib
import minimoe.train as train_lib
from minimoe.checkpoint import CheckpointError, load_checkpoint, load_training_state, save_checkpoint
from minimoe.data import ByteTokenizer, TokenDataset
from minimoe.model import MiniLM
from minimoe.train import TrainConfig, evaluate, lr_schedule, train


def _losses(result):
    return [h["loss"] for h in result.history["train"]]


# -----------------------------------------------------------------------------
# learning and history


def test_loss_decreases(tiny_config, tiny_data, tiny_train_config):
    tc = dataclasses.replace(tiny_train_config, steps=30, eval_every=30, warmup_steps=3)
    losses = _losses(train(tiny_config, tc, data=tiny_data, progress=False))
    assert len(losses) == 30
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < first - 1.0, (first, last)  # ln(260) = 5.56 at init; byte statistics alone give far less
    assert all(math.isfinite(x) for x in losses)


def test_history(tiny_config, tiny_data, tiny_train_config):
    result = train(tiny_config, tiny_train_config, data=tiny_data, progress=False)
    h = result.history
    assert isinstance(result.model, MiniLM)
    assert result.checkpoint is None
    assert [e["step"] for e in h["train"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in h["eval"]] == [3, 6]  # every eval_every steps, and the last step
    tokens_per_step = tiny_train_config.batch_size * tiny_train_config.seq_len
    for e in h["train"]:
        assert math.isfinite(e["loss"]) and e["loss"] > 0
        assert e["tokens"] == e["step"] * tokens_per_step
        assert e["lr"] > 0 and math.isfinite(e["grad_norm"])
    for e in h["eval"]:
        assert math.isfinite(e["val_loss"]) and math.isfinite(e["val_bpb"])
        assert 0 < e["val_bpb"] < 9  # a trained byte model beats log2(260) bits per byte
    assert h["eval"][-1]["val_loss"] < h["eval"][0]["val_loss"]
    assert h["train_config"] == tiny_train_config.to_dict()
    # the last eval is the returned model's evaluate() on the same windows
    r = evaluate(result.model, tiny_data[1], tiny_train_config.batch_size, tiny_train_config.seq_len,
                 tiny_train_config.eval_batches)
    assert r["loss"] == pytest.approx(h["eval"][-1]["val_loss"], rel=1e-6)


def test_training_is_deterministic(tiny_config, tiny_data, tiny_train_config):
    a = train(tiny_config, tiny_train_config, data=tiny_data, progress=False)
    b = train(tiny_config, tiny_train_config, data=tiny_data, progress=False)
    assert _losses(a) == _losses(b)
    c = train(tiny_config, dataclasses.replace(tiny_train_config, seed=1), data=tiny_data, progress=False)
    assert _losses(c) != _losses(a)


def test_out_dir_gets_a_checkpoint_of_the_final_model(tmp_path, tiny_config, tiny_data, tiny_train_config):
    result = train(tiny_config, tiny_train_config, data=tiny_data, out_dir=tmp_path / "run", progress=False)
    assert result.checkpoint == tmp_path / "run"
    loaded = load_checkpoint(tmp_path / "run")
    for k, v in result.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# -----------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("k", [2, 4])
def test_resume_is_exact(tmp_path, tiny_config, tiny_data, tiny_train_config, k):
    tc = dataclasses.replace(tiny_train_config, eval_every=2)
    full = train(tiny_config, tc, data=tiny_data, progress=False)

    part = train(tiny_config, tc, data=tiny_data, out_dir=tmp_path / "run", stop_after=k, progress=False)
    assert [e["step"] for e in part.history["train"]] == list(range(1, k + 1))
    resumed = train(tiny_config, tc, data=tiny_data, out_dir=tmp_path / "run", resume=True, progress=False)

    assert _losses(resumed) == _losses(full)  # bit-identical, not approximately equal
    assert [e["step"] for e in resumed.history["train"]] == list(range(1, tc.steps + 1))
    assert [e["lr"] for e in resumed.history["train"]] == [e["lr"] for e in full.history["train"]]
    assert resumed.history["eval"] == full.history["eval"]
    full_sd, res_sd = full.model.state_dict(), resumed.model.state_dict()
    for name in full_sd:
        assert torch.equal(full_sd[name], res_sd[name]), name


def test_resume_in_several_pieces(tmp_path, tiny_config, tiny_data, tiny_train_config):
    full = train(tiny_config, tiny_train_config, data=tiny_data, progress=False)
    run = tmp_path / "run"
    train(tiny_config, tiny_train_config, data=tiny_data, out_dir=run, stop_after=2, progress=False)
    train(tiny_config, tiny_train_config, data=tiny_data, out_dir=run, stop_after=3, resume=True, progress=False)
    last = train(tiny_config, tiny_train_config, data=tiny_data, out_dir=run, resume=True, progress=False)
    assert _losses(last) == _losses(full)
    assert torch.equal(last.model.embed.weight, full.model.embed.weight)


def test_resume_after_a_crash_from_periodic_checkpoint(tmp_path, tiny_config, tiny_data, tiny_train_config,
                                                       monkeypatch):
    tc = dataclasses.replace(tiny_train_config, checkpoint_every=2)
    full = train(tiny_config, tc, data=tiny_data, progress=False)
    real_forward = MiniLM.forward
    calls = {"n": 0}

    def crashing_forward(self, input_ids, targets=None, cache=None):
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt  # killed during step 5; the last checkpoint is from step 4
        return real_forward(self, input_ids, targets=targets, cache=cache)

    monkeypatch.setattr(MiniLM, "forward", crashing_forward)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config, tc, data=tiny_data, out_dir=tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert load_training_state(tmp_path / "run")[0]["step"] == 4
    resumed = train(tiny_config, tc, data=tiny_data, out_dir=tmp_path / "run", resume=True, progress=False)
    assert _losses(resumed) == _losses(full)
    assert resumed.history["eval"] == full.history["eval"]
    assert torch.equal(resumed.model.embed.weight, full.model.embed.weight)


# -----------------------------------------------------------------------------
# exact resume with dropout: every random generator the loop draws from is restored

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ON_DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


@pytest.mark.parametrize("device", ON_DEVICES)
def test_resume_with_dropout_is_exact(tmp_path, tiny_config, tiny_data, tiny_train_config, monkeypatch, device):
    """Dropout draws from the training device's torch generator. A resumed run must continue that stream:
    not replay step 1's masks (train() reseeds every device at its start, and a checkpoint that holds only the
    CPU's state leaves a GPU's reseeded), and not continue from a state something else drew from after the
    last step (the first MFU measurement of a process draws its random matrices)."""
    cfg = dataclasses.replace(tiny_config, dropout=0.2)
    tc = dataclasses.replace(tiny_train_config, device=device, eval_every=2)
    full = train(cfg, tc, data=tiny_data, progress=False)
    assert _losses(full) != _losses(train(tiny_config, tc, data=tiny_data, progress=False))  # the masks matter

    real_peak = device_lib.matmul_peak
    monkeypatch.setattr(device_lib, "matmul_peak", lambda dtype, dev, sizes, repeats: real_peak(dtype, dev, (64,), 1))
    monkeypatch.setattr(device_lib, "_PEAK_CACHE", {})  # as in a fresh process: the peak is measured at the end
    run = tmp_path / "run"
    train(cfg, tc, data=tiny_data, out_dir=run, stop_after=3, progress=False)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # what the caller does in between is no matter
    resumed = train(cfg, tc, data=tiny_data, out_dir=run, resume=True, progress=False)

    assert _losses(resumed) == _losses(full)  # bit-identical
    assert resumed.history["eval"] == full.history["eval"]
    for name, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], v), name


def test_resume_from_a_checkpoint_without_every_generator(tmp_path, tiny_config, tiny_data, tiny_train_config,
                                                          monkeypatch):
    """A checkpoint written before minimoe saved every generator holds torch's CPU state only. It still resumes:
    exactly on a CPU, silently; on a device whose generator it lacks, with a warning that says why the losses
    will not match an uninterrupted run's."""
    cfg = dataclasses.replace(tiny_config, dropout=0.2)
    full = train(cfg, tiny_train_config, data=tiny_data, progress=False)
    for run in (tmp_path / "a", tmp_path / "b"):
        train(cfg, tiny_train_config, data=tiny_data, out_dir=run, stop_after=3, progress=False)
        as_old_checkpoint(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = train(cfg, tiny_train_config, data=tiny_data, out_dir=tmp_path / "a", resume=True, progress=False)
    assert _losses(resumed) == _losses(full)

    real = train_lib.restore_rng_state  # as if this run were on a GPU: the checkpoint has no CUDA state for it
    monkeypatch.setattr(train_lib, "restore_rng_state", lambda state, device: real(state, torch.device("cuda", 0)))
    with pytest.warns(UserWarning, match=r"cuda:0.*not in the checkpoint.*dropout.*will not match"):
        train(cfg, tiny_train_config, data=tiny_data, out_dir=tmp_path / "b", resume=True, progress=False)


def test_resume_without_checkpoint(tmp_path, tiny_config, tiny_data, tiny_train_config):
    with pytest.raises(CheckpointError):
        train(tiny_config, tiny_train_config, data=tiny_data, out_dir=tmp_path / "none", resume=True,
              progress=False)
    with pytest.raises(CheckpointError):
        train(tiny_config, tiny_train_config, data=tiny_data, resume=True, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        train(tiny_config, tiny_train_config, data=tiny_data, out_dir=tmp_path / "empty", resume=True,
              progress=False)


def test_resume_from_model_only_checkpoint(tmp_path, tiny_config, tiny_data, tiny_train_config):
    save_checkpoint(tmp_path / "ck", MiniLM(tiny_config))
    with pytest.raises(CheckpointError, match="model-only"):
        train(tiny_config, tiny_train_config, data=tiny_data, out_dir=tmp_path / "ck", resume=True,
              progress=False)


def test_resume_with_different_train_config(tmp_path, tiny_config, tiny_data, tiny_train_config):
    run = tmp_path / "run"
    train(tiny_config, tiny_train_config, data=tiny_data, out_dir=run, stop_after=2, progress=False)
    other = dataclasses.replace(tiny_train_config, lr=5e-3)
    with pytest.raises(CheckpointError, match="different TrainConfig"):
        train(tiny_config, other, data=tiny_data, out_dir=run, resume=True, progress=False)
    other_model = dataclasses.replace(tiny_config, n_layers=3)
    with pytest.raises(CheckpointError, match="n_layers"):
        train(other_model, tiny_train_config, data=tiny_data, out_dir=run, resume=True, progress=False)


# -----------------------------------------------------------------------------
# gradient accumulation


def test_gradient_accumulation(tiny_config, tiny_data, tiny_train_config):
    micro = tiny_train_config.batch_size * tiny_train_config.seq_len
    assert tiny_train_config.accumulation_steps == 1 and tiny_train_config.tokens_per_step == micro
    tc = dataclasses.replace(tiny_train_config, batch_tokens=2 * micro, steps=3)
    assert tc.accumulation_steps == 2
    assert tc.tokens_per_step == 2 * micro
    assert dataclasses.replace(tc, batch_tokens=4 * micro).accumulation_steps == 4
    result = train(tiny_config, tc, data=tiny_data, progress=False)
    assert [e["tokens"] for e in result.history["train"]] == [2 * micro, 4 * micro, 6 * micro]
    assert all(math.isfinite(x) for x in _losses(result))
    plain = train(tiny_config, dataclasses.replace(tiny_train_config, steps=3), data=tiny_data, progress=False)
    assert _losses(plain)[0] != _losses(result)[0]  # two micro-batches were averaged, not one


def test_accumulated_step_equals_one_big_batch(tiny_config, tiny_train_config, monkeypatch):
    """Two micro-batches of 2 rows must give the same update as one batch of 4 over the same rows
    (the sampler is pinned so both runs see identical windows)."""
    stream = np.tile(np.frombuffer(b"the cat sat on a mat. ", dtype=np.uint8).astype(np.uint16), 20)
    ds = TokenDataset.from_streams({"text": stream})
    big = dataclasses.replace(tiny_train_config, steps=1, batch_size=4, eval_every=1, eval_batches=1,
                              warmup_steps=0, grad_clip=None)
    acc = dataclasses.replace(big, batch_size=2, batch_tokens=4 * big.seq_len)
    assert acc.accumulation_steps == 2

    def fixed(self, batch_size, seq_len, rng, weights=None, return_domains=False):
        x = torch.from_numpy(stream[:seq_len].astype(np.int64)).repeat(batch_size, 1)
        y = torch.from_numpy(stream[1:seq_len + 1].astype(np.int64)).repeat(batch_size, 1)
        return (x, y, torch.zeros(batch_size, dtype=torch.long)) if return_domains else (x, y)

    monkeypatch.setattr(TokenDataset, "sample_batch", fixed)
    a = train(tiny_config, big, data=(ds, ds), progress=False)
    b = train(tiny_config, acc, data=(ds, ds), progress=False)
    assert _losses(a)[0] == pytest.approx(_losses(b)[0], rel=1e-6)
    assert a.history["train"][0]["tokens"] == b.history["train"][0]["tokens"] == 4 * big.seq_len
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


# -----------------------------------------------------------------------------
# LR schedules


def _expected_lr(cfg: TrainConfig, s: int) -> float:
    """Closed form: linear warm-up lr*(s+1)/(w+1) up to lr at step w, then decay to lr*min_lr_ratio at the
    last step (index steps-1)."""
    w, lr, lo = cfg.warmup_steps, cfg.lr, cfg.lr * cfg.min_lr_ratio
    if s < w:
        return lr * (s + 1) / (w + 1)
    frac = (s - w) / max(1, cfg.steps - 1 - w)
    if cfg.schedule == "cosine":
        return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.schedule == "linear":
        return lr + (lo - lr) * frac
    d = max(1, cfg.steps - 1 - w)
    if cfg.schedule == "exponential":
        return lr * cfg.min_lr_ratio ** ((s - w) / d)
    if cfg.schedule == "step":
        drops = sum(s - w >= max(1, round(k * d / 3)) for k in (1, 2, 3))
        return lr * cfg.min_lr_ratio ** (drops / 3)
    return lr


@pytest.mark.parametrize("schedule", ["cosine", "linear", "step", "exponential", "constant"])
@pytest.mark.parametrize("steps, warmup", [(20, 5), (12, 0), (7, 3), (5, 3)])
def test_lr_schedule_closed_form(schedule, steps, warmup):
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, lr=2e-3, min_lr_ratio=0.1, schedule=schedule,
                      device="cpu")
    lrs = lr_schedule(cfg)
    expected = [_expected_lr(cfg, s) for s in range(steps)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "exponential"])
def test_decaying_schedule_shape(schedule):
    cfg = TrainConfig(steps=20, warmup_steps=5, lr=1e-3, min_lr_ratio=0.1, schedule=schedule, device="cpu")
    lrs = lr_schedule(cfg)
    warm = lrs[:6]
    assert all(b > a for a, b in zip(warm, warm[1:]))                        # rises during warm-up
    assert np.allclose(np.diff(warm), warm[1] - warm[0])                     # ... linearly
    assert lrs[5] == pytest.approx(cfg.lr)                                   # peak right after warm-up
    assert max(lrs) == pytest.approx(cfg.lr)
    decay = lrs[5:]
    assert all(b < a for a, b in zip(decay, decay[1:]))                      # then strictly decays
    assert lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-9)     # to the floor at the last step
    assert min(lrs[5:]) == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-9)


def test_step_schedule_drops_three_times_at_the_thirds():
    cfg = TrainConfig(steps=32, warmup_steps=1, lr=1e-3, min_lr_ratio=0.125, schedule="step", device="cpu")
    lrs = lr_schedule(cfg)
    assert lrs[1] == pytest.approx(1e-3)
    levels = sorted(set(round(x, 12) for x in lrs[1:]), reverse=True)
    assert levels == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])       # factor 0.125 ** (1/3) = 0.5 per drop
    assert lrs[-1] == pytest.approx(1.25e-4)
    drops = [i for i in range(2, 32) if lrs[i] < lrs[i - 1] * 0.99]
    assert drops == [11, 21, 31]                                          # 30 decay steps: at 10, 20, 30


def test_constant_schedule_after_warmup():
    cfg = TrainConfig(steps=10, warmup_steps=3, lr=1e-3, schedule="constant", device="cpu")
    lrs = lr_schedule(cfg)
    assert lrs[:3] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    assert lrs[3:] == pytest.approx([1e-3] * 7)


def test_history_records_the_schedule(tiny_config, tiny_data, tiny_train_config):
    result = train(tiny_config, tiny_train_config, data=tiny_data, progress=False)
    recorded = [e["lr"] for e in result.history["train"]]
    assert recorded == pytest.approx(lr_schedule(tiny_train_config), rel=1e-12)
    assert recorded[-1] == pytest.approx(tiny_train_config.lr * tiny_train_config.min_lr_ratio)


# -----------------------------------------------------------------------------
# precision


def test_bf16_training(tiny_config, tiny_data, tiny_train_config):
    tc = dataclasses.replace(tiny_train_config, precision="bf16")
    result = train(tiny_config, tc, data=tiny_data, progress=False)
    losses = _losses(result)
    assert len(losses) == tc.steps and all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(e["val_bpb"]) for e in result.history["eval"])
    assert result.model.embed.weight.dtype == torch.float32  # weights stay fp32 under autocast
    # and switching back to fp32 in the same process still works (accelerate's global state is reset)
    fp32 = train(tiny_config, tiny_train_config, data=tiny_data, progress=False)
    assert all(math.isfinite(x) for x in _losses(fp32))
    assert _losses(fp32) != losses  # bf16 autocast really was on


# -----------------------------------------------------------------------------
# TrainConfig validation


@pytest.mark.parametrize("kwargs, field", [
    ({"schedule": "dynamic-cosine"}, "schedule"),
    ({"schedule": "exponential", "min_lr_ratio": 0.0}, "min_lr_ratio"),
    ({"schedule": "step", "min_lr_ratio": 0.0}, "min_lr_ratio"),
    ({"batch_size": 4, "seq_len": 32, "batch_tokens": 31}, "batch_tokens"),
    ({"domain_weights": {"code": -1.0}}, "domain_weights"),
    ({"domain_weights": {"code": 0.0, "prose": 0}}, "domain_weights"),
    ({"domain_weights": {"code": float("nan")}}, "domain_weights"),
    ({"domain_weights": {}}, "domain_weights"),
    ({"mixture_temperature": 0.0}, "mixture_temperature"),
    ({"mixture_temperature": 2.0, "domain_weights": {"code": 1.0}}, "mixture_temperature"),
    ({"precision": "fp8"}, "precision"),
    ({"precision": "fp16"}, "precision"),
    ({"batch_size": 4, "seq_len": 32, "batch_tokens": 200}, "batch_tokens"),
    ({"batch_size": 4, "seq_len": 32, "batch_tokens": 64}, "batch_tokens"),
    ({"batch_tokens": 0}, "batch_tokens"),
    ({"steps": 0}, "steps"),
    ({"steps": -3}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"batch_size": 0}, "batch_size"),
    ({"seq_len": 0}, "seq_len"),
    ({"eval_every": 0}, "eval_every"),
    ({"eval_batches": 0}, "eval_batches"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"lr": 0.0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"grad_clip": 0.0}, "grad_clip"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
])
def test_train_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_train_config_round_trip_and_unknown_fields():
    tc = TrainConfig(steps=7, batch_tokens=2 * 16 * 256, schedule="linear", domain_weights={"code": 1.0})
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(ValueError, match="stpes"):
        TrainConfig.from_dict({"stpes": 3})


# -----------------------------------------------------------------------------
# divergence


def test_divergence_raises(tiny_config, tiny_data, tiny_train_config):
    tc = dataclasses.replace(tiny_train_config, lr=1e9, warmup_steps=0)
    with pytest.raises(FloatingPointError, match=r"diverged at step \d+"):
        train(tiny_config, tc, data=tiny_data, progress=False)


def test_nan_loss_names_the_step(tiny_config, tiny_data, tiny_train_config, monkeypatch):
    real_forward = MiniLM.forward
    calls = {"train": 0}

    def forward(self, input_ids, targets=None, cache=None):
        out = real_forward(self, input_ids, targets=targets, cache=cache)
        if targets is not None and self.training:
            calls["train"] += 1
            if calls["train"] == 3:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MiniLM, "forward", forward)
    with pytest.raises(FloatingPointError, match="step 3"):
        train(tiny_config, tiny_train_config, data=tiny_data, progress=False)


# -----------------------------------------------------------------------------
# evaluate


def test_evaluate_pure_bytes_bpb_is_loss_over_ln2(tiny_config):
    rng = np.random.default_rng(0)
    stream = rng.integers(97, 123, size=32 * 8 + 1).astype(np.uint16)  # lowercase letters, no specials
    ds = TokenDataset.from_streams({"text": stream})
    torch.manual_seed(0)
    model = MiniLM(tiny_config)
    r = evaluate(model, ds, batch_size=4, seq_len=32, max_batches=None)
    assert r["tokens"] == 32 * 8
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=1e-9)
    # and the loss is the plain mean cross-entropy over every window
    x = torch.from_numpy(stream[:-1].astype(np.int64)).view(8, 32)
    y = torch.from_numpy(stream[1:].astype(np.int64)).view(8, 32)
    with torch.no_grad():
        logits = model(x).logits
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert r["loss"] == pytest.approx(expected, rel=1e-5)
    assert model.training  # evaluate restores the training flag


def test_evaluate_bpb_counts_only_bytes(tiny_config, tiny_data):
    val = tiny_data[1]
    torch.manual_seed(0)
    model = MiniLM(tiny_config)
    r = evaluate(model, val, batch_size=4, seq_len=32, max_batches=None)
    tok = ByteTokenizer()
    targets = torch.cat([y.flatten() for _, y in val.eval_batches(4, 32)])
    n_bytes = tok.count_bytes(targets)
    assert r["tokens"] == targets.numel()
    assert n_bytes < targets.numel()  # eos separators are targets but not bytes
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2) * r["tokens"] / n_bytes, rel=1e-9)
    assert r["bpb"] > r["loss"] / math.log(2)


def test_evaluate_domain_and_cap(tiny_config, tiny_data):
    val = tiny_data[1]
    model = MiniLM(tiny_config)
    capped = evaluate(model, val, batch_size=4, seq_len=32, max_batches=2)
    assert capped["tokens"] == 2 * 4 * 32
    code = evaluate(model, val, batch_size=4, seq_len=32, max_batches=None, domain="code")
    assert code["tokens"] == (val.n_tokens("code") - 1) // 32 * 32
    with pytest.raises(ValueError):
        evaluate(model, val, batch_size=4, seq_len=32, domain="nope")


# -----------------------------------------------------------------------------
# data mixture, tokens seen, throughput


def test_tokens_per_domain_follow_the_weights(tiny_config, tiny_data, tiny_train_config):
    train_ds = tiny_data[0]
    assert len(train_ds.domains) >= 2
    a, b = train_ds.domains[:2]
    tc = dataclasses.replace(tiny_train_config, steps=30, domain_weights={a: 3.0, b: 1.0})
    h = train(tiny_config, tc, data=tiny_data, progress=False).history
    assert h["mixture"][a] == pytest.approx(0.75) and h["mixture"][b] == pytest.approx(0.25)
    seen = h["domain_tokens"]
    assert sum(seen.values()) == h["train"][-1]["tokens"] == 30 * tc.tokens_per_step
    assert 0.6 < seen[a] / (seen[a] + seen[b]) < 0.9          # 240 rows drawn with p = 0.75
    assert all(v == 0 for d, v in seen.items() if d not in (a, b))


def test_unknown_domain_in_weights_names_the_field(tiny_config, tiny_data, tiny_train_config):
    tc = dataclasses.replace(tiny_train_config, domain_weights={"poetry": 1.0})
    with pytest.raises(ValueError, match="domain_weights.*poetry"):
        train(tiny_config, tc, data=tiny_data, progress=False)


def test_mixture_temperature():
    ds = TokenDataset.from_streams({"big": np.zeros(900, np.uint16), "small": np.zeros(100, np.uint16)})
    assert ds.mixture_weights(1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    assert ds.mixture_weights(2.0) == pytest.approx({"big": 0.75, "small": 0.25})   # sqrt: 30 : 10
    assert ds.mixture_weights(1e9) == pytest.approx({"big": 0.5, "small": 0.5})
    with pytest.raises(ValueError, match="temperature"):
        ds.mixture_weights(0.0)


def test_eval_reports_loss_per_domain(tiny_config, tiny_data, tiny_train_config):
    result = train(tiny_config, tiny_train_config, data=tiny_data, progress=False)
    assert set(result.history["eval"][-1]["val_loss_by_domain"]) == set(tiny_data[1].domains)
    val = tiny_data[1]
    r = evaluate(result.model, val, 4, 16, max_batches=None)
    for d in val.domains:   # each domain's share equals evaluating that domain alone over the same windows
        alone = evaluate(result.model, val, 4, 16, max_batches=None, domain=d)
        assert r["loss_by_domain"][d] == pytest.approx(alone["loss"], rel=1e-6)
    n = {d: (len(val.streams[d]) - 1) // 16 * 16 for d in val.domains}
    mean = sum(r["loss_by_domain"][d] * n[d] for d in val.domains) / sum(n.values())
    assert r["loss"] == pytest.approx(mean, rel=1e-6)          # the overall loss is their token-weighted mean


def test_throughput_and_mfu(tiny_config, tiny_data, tiny_train_config):
    result = train(tiny_config, tiny_train_config, data=tiny_data, progress=False)
    t, last = result.history["throughput"], result.history["train"][-1]
    assert t["tokens_per_second"] == pytest.approx(last["tokens"] / last["seconds"])
    assert t["model_flops_per_second"] == pytest.approx(
        result.model.flops_per_token(tiny_train_config.seq_len) * t["tokens_per_second"])
    assert 0 < t["mfu"] < 1 and t["peak_source"].startswith("measured")
    seconds = [e["seconds"] for e in result.history["train"]]
    assert all(b > a for a, b in zip(seconds, seconds[1:]))
