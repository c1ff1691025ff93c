"""What each quantization scheme buys, measured in one run: decode speed, bits per byte, accuracy and bytes.

    decode_speed(models)    bench_infer.benchmark on every model, round-robin over `rounds` rounds (so a busy
                            machine slows all of them alike); speed-up = median over rounds of
                            fp32 decode time / the scheme's decode time, with its range
    lm_metrics(model, val)  held-out bits per byte and next-byte accuracy (top-1) on deterministic windows
    compression(qmodel)     bits per weight and compression against fp16 / fp32, from a saved checkpoint's bytes
    ao_dynamic_int8(model)  torch.ao's dynamic int8 (fbgemm/onednn) on the same layers: the outside reference
    without_matmuls(model)  the same model with those layers returning zeros at no cost: the decode speed that
                            no weight format can beat (the rest of the step: norms, attention, cache, sampling)
    suite_scores(name, ...) the capability suite on a quantized zoo model, cached beside its checkpoint
    goals()                 the issue's goals, each as one measured ratio (`minimoe bench quant`)
"""
from __future__ import annotations

import math
import statistics
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data import ByteTokenizer
from .checkpoint import layer_table, save_quantized, stored_bytes
from .policy import KEPT, fresh_copy, quantize, targets

# label -> quantize() arguments; None is the fp32 model, "ao" torch.ao's dynamic int8
SPEED_SCHEMES = {
    "fp32": None,
    "int8 per channel": dict(bits=8),
    "int8 W8A8 (dynamic activations)": dict(bits=8, activation_quant=True),
    "int4 g128": dict(bits=4, group_size=128),
    "int4 g128, reference (dequantize + matmul)": dict(bits=4, group_size=128, kernel="reference"),
    "torch.ao dynamic int8": "ao",
    "ceiling: those layers cost nothing": "free",
}

# name -> (goal, op, what is measured)
GOALS = {
    "int4_g128_decode_speedup": (3.0, ">=", "int4 g128 decode tokens/s / fp32, batch 1"),
    "int8_decode_speedup": (2.5, ">=", "int8 per-channel decode tokens/s / fp32, batch 1"),
    "int8_bpb_increase": (0.005, "<=", "relative bits-per-byte increase, int8 per channel (RTN)"),
    "int4_g128_rtn_bpb_increase": (0.03, "<=", "relative bits-per-byte increase, int4 g128 RTN"),
    "gptq_over_rtn_increase": (0.5, "<=", "int4 g128 GPTQ's bpb increase / RTN's"),
    "int4_g128_compression_vs_fp16": (3.8, ">=", "fp16 bytes / stored bytes of the quantized weights"),
}


def ao_dynamic_int8(model: nn.Module) -> nn.Module:
    """torch.ao.quantization.quantize_dynamic with per-channel int8 weights on the Linear layers our default
    policy quantizes (not routers, not the head). Its activations are quantized per tensor (uint8), ours per
    token. torch.ao's eager quantization is deprecated in favour of torchao; it still runs in torch 2.x."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    names = {name for name, m, kind in targets(model) if isinstance(m, nn.Linear) and kind not in KEPT}
    with warnings.catch_warnings():  # its deprecation notices, once per layer
        warnings.simplefilter("ignore")
        return quantize_dynamic(fresh_copy(model), {n: per_channel_dynamic_qconfig for n in names},
                                dtype=torch.qint8)


class _Free(nn.Module):
    """Stands in for a Linear and returns zeros of its output shape: what the layer would cost if reading and
    multiplying its weights took no time at all."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def without_matmuls(model: nn.Module) -> nn.Module:
    """A copy whose quantizable Linear layers (all but routers and the head) cost nothing. Its outputs are
    meaningless; its decode time is the floor that no weight format, however small or fast, can go below."""
    from .policy import _set_module
    free = fresh_copy(model)
    for name, m, kind in targets(free):
        if isinstance(m, nn.Linear) and kind not in KEPT:
            _set_module(free, name, _Free(m.out_features))
    return free


def build_schemes(model: nn.Module, schemes: dict = SPEED_SCHEMES) -> dict:
    """{label: model} for each entry of `schemes` (the model itself for None)."""
    special = {"ao": ao_dynamic_int8, "free": without_matmuls}
    return {label: model if kw is None else special[kw](model) if isinstance(kw, str) else quantize(model, **kw)
            for label, kw in schemes.items()}


def decode_speed(models: dict, batch_size: int = 1, prompt_len: int = 64, new_tokens: int = 64, rounds: int = 5,
                 baseline: str = "fp32", progress: bool = False) -> list[dict]:
    """Decode tokens/s of each model (bench_infer.benchmark, greedy, held-out text prompts), round-robin.

    Every round runs each model once (after one warm-up run in the first round). Returns one row per model:
    median decode tokens/s, ms per step, the speed-up over `baseline` (median over rounds of the per-round
    ratio, with min and max) and whether every timed run produced model.generate's tokens.
    """
    from ..bench_infer import benchmark
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models: {list(models)}")
    times = {label: [] for label in models}
    matches = {label: True for label in models}
    for r in tqdm(range(rounds), desc="decode rounds", disable=not progress):
        for label, m in models.items():
            row = benchmark(m, batch_size, prompt_len, new_tokens, repeats=1, warmup=1 if r == 0 else 0)
            times[label].append(row["decode_s"])
            matches[label] = matches[label] and row["matches_generate"]
    steps = batch_size * (new_tokens - 1)
    rows = []
    for label, t in times.items():
        ratios = [b / s for b, s in zip(times[baseline], t)]
        rows.append({"scheme": label, "decode_tokens_per_s": steps / statistics.median(t),
                     "ms_per_step": statistics.median(t) * 1e3 / (new_tokens - 1) if new_tokens > 1 else None,
                     "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
                     "matches_generate": matches[label], "rounds": rounds, "batch_size": batch_size})
    return rows


@torch.no_grad()
def lm_metrics(model: nn.Module, dataset, batch_size: int = 16, seq_len: int | None = None,
               max_batches: int = 8) -> dict:
    """Bits per byte (as minimoe.train.evaluate computes it) and next-byte top-1 accuracy on the dataset's
    deterministic evaluation windows."""
    seq_len = seq_len or model.config.max_seq_len
    tok = ByteTokenizer()
    nats = correct = n = n_bytes = 0
    for x, y in dataset.eval_batches(batch_size, seq_len, max_batches=max_batches):
        x, y = x.to(model.device), y.to(model.device)
        out = model(x, targets=y)
        nats += float(out.loss) * y.numel()
        correct += int((out.logits.argmax(-1) == y).sum())
        n += y.numel()
        n_bytes += tok.count_bytes(y.flatten())
    return {"bpb": nats / math.log(2) / max(n_bytes, 1), "accuracy": correct / n, "tokens": n}


def compression(qmodel: nn.Module, folder: str | Path | None = None) -> dict:
    """Save `qmodel` (to `folder`, or a temporary one) and measure its bytes.

    weights: the quantized layers' stored codes, scales and zero points against those weights in fp16 / fp32;
    file: the whole model.safetensors (kept layers, norms and embeddings included, at their own precision)
    against the same model's weights in fp16 / fp32 (2 or 4 bytes per parameter).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = save_quantized(qmodel, Path(folder) if folder else Path(tmp) / "q")
        sizes = stored_bytes(path)
        file_bytes = (path / "model.safetensors").stat().st_size
    layers = layer_table(qmodel)
    n_weights = sum(v["in_features"] * v["out_features"] if v["type"] == "linear"
                    else 3 * v["n_experts"] * v["d_model"] * v["d_ff"] for v in layers.values())
    q_bytes = sum(b for k, b in sizes.items() if any(k.startswith(name + ".") for name in layers))
    n_params = n_weights + sum(v.numel() for k, v in qmodel.state_dict().items()
                               if not any(k.startswith(name + ".") for name in layers)
                               and not (k == "lm_head.weight" and qmodel.config.tie_embeddings))
    bpw = 8 * q_bytes / n_weights
    return {"quantized_weights": n_weights, "quantized_bytes": q_bytes, "bits_per_weight": bpw,
            "weights_vs_fp16": 16 / bpw, "weights_vs_fp32": 32 / bpw,
            "file_bytes": file_bytes, "parameters": n_params,
            "file_vs_fp16": 2 * n_params / file_bytes, "file_vs_fp32": 4 * n_params / file_bytes}


def suite_scores(name: str, n: int = 200, seed: int = 0, k: int = 4, **quant) -> dict:
    """minimoe.evals.evaluate_suite of the zoo model `name` quantized with quantize(model, **quant) (plain
    arguments only), cached as JSON in zoo.results_dir(name) as studies.suite_scores caches the float model's:
    RTN is deterministic, so the scores depend only on the weights, the scheme and the suite's settings."""
    import dataclasses
    import hashlib
    import json

    from .. import __version__, zoo
    from ..evals import AxisResult, evaluate_suite
    from .checkpoint import FORMAT
    key = hashlib.sha256(json.dumps({**quant, "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:10]
    entry = zoo.load(name)
    path = zoo.results_dir(name) / f"evals-quant-{key}-v{__version__}-n{n}-k{k}-s{seed}.json"
    if path.exists():
        return {axis: AxisResult(**{**d, "score_ci": tuple(d["score_ci"]), "value_ci": tuple(d["value_ci"])})
                for axis, d in json.loads(path.read_text()).items()}
    results = evaluate_suite(quantize(entry.model, **quant), n=n, seed=seed, k=k)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({axis: dataclasses.asdict(r) for axis, r in results.items()}))
    tmp.replace(path)
    return results


def _row(name: str, measured, detail: str) -> dict:
    goal, op, what = GOALS[name]
    met = None if measured is None else (measured >= goal if op == ">=" else measured <= goal)
    return {"name": name, "what": what, "measured": measured, "goal": goal, "op": op, "met": met, "detail": detail}


QUALITY_MODELS = {  # label -> zoo recipes whose mean is reported
    "dense-tiny": ["dense-tiny"],               # 256 wide: group 128 is a real group
    "mix-uniform, 3 seeds": ["mix-uniform", "mix-uniform-s1", "mix-uniform-s2"],  # chapter 3's dense model
}


def quality_increases(names: list[str], eval_batches: int = 8, device="cpu") -> dict:
    """Mean relative bits-per-byte increase over the zoo models `names` for int8 per channel, int4 g128 RTN and
    GPTQ, with each model's numbers (held-out split of its corpus; GPTQ calibrated on its training split)."""
    from .. import zoo
    from ..data import corpus_splits
    per_model = {}
    for name in names:
        model = zoo.load(name, device=str(device)).model
        _, val = corpus_splits(zoo.recipe(name).corpus)
        seq = model.config.max_seq_len
        schemes = {"fp32": model, "int8": quantize(model, 8), "int4 g128 RTN": quantize(model, 4),
                   "int4 g128 GPTQ": quantize(model, 4, method="gptq")}
        per_model[name] = {k: lm_metrics(m, val, batch_size=max(1, 2048 // seq), max_batches=eval_batches)
                           for k, m in schemes.items()}
    mean = {k: sum(q[k]["bpb"] / q["fp32"]["bpb"] - 1 for q in per_model.values()) / len(per_model)
            for k in ("int8", "int4 g128 RTN", "int4 g128 GPTQ")}
    return {"increase": mean, "models": per_model}


def goals(device="cpu", rounds: int = 5, prompt_len: int = 64, new_tokens: int = 64, eval_batches: int = 8,
          config=None, progress: bool = True) -> dict:
    """The issue's goals, measured in one run.

    Speed: the 6-layer, 384-wide benchmark model (bench.BENCH_MODEL, random weights: they time like trained
    ones) at batch 1, every scheme of SPEED_SCHEMES, `decode_speed`. Quality: int8 per channel, int4 g128 RTN and
    GPTQ on each group of QUALITY_MODELS (dense-tiny, where group 128 is a real group but 4 bits barely move
    its bits per byte, and chapter 3's 64-wide dense model over three seeds, where they do). Bytes: dense-tiny's
    int4 g128 checkpoint.
    """
    from .. import zoo
    from ..bench import BENCH_MODEL
    from ..device import resolve_device
    from ..model import MiniLM
    device = resolve_device(device)
    torch.manual_seed(0)
    bench_model = MiniLM(config or BENCH_MODEL).to(device).eval()
    speed = decode_speed(build_schemes(bench_model), 1, prompt_len, new_tokens, rounds, progress=progress)
    by = {r["scheme"]: r for r in speed}
    quality = {label: quality_increases(names, eval_batches, device) for label, names in QUALITY_MODELS.items()}
    comp = compression(quantize(zoo.load("dense-tiny", device=str(device)).model, 4))
    ceiling = by.get("ceiling: those layers cost nothing")

    def speed_detail(label):
        r = by[label]
        return (f"{r['decode_tokens_per_s']:.0f} vs {by['fp32']['decode_tokens_per_s']:.0f} tokens/s, "
                f"range {r['speedup_min']:.2f}-{r['speedup_max']:.2f}x over {rounds} rounds"
                + (f"; no format can beat {ceiling['speedup']:.2f}x here" if ceiling else ""))
    rows = [
        _row("int4_g128_decode_speedup", by["int4 g128"]["speedup"], speed_detail("int4 g128")),
        _row("int8_decode_speedup", by["int8 per channel"]["speedup"], speed_detail("int8 per channel")),
    ]
    for label, q in quality.items():
        inc = q["increase"]
        rtn, gptq = inc["int4 g128 RTN"], inc["int4 g128 GPTQ"]
        rows += [
            _row("int8_bpb_increase", inc["int8"], label),
            _row("int4_g128_rtn_bpb_increase", rtn, label),
            _row("gptq_over_rtn_increase", gptq / rtn if rtn > 0 else None,
                 f"{label}: GPTQ {gptq:+.3%}, RTN {rtn:+.3%}" + ("" if rtn > 0 else " (no RTN increase: no ratio)")),
        ]
    rows.append(_row("int4_g128_compression_vs_fp16", comp["weights_vs_fp16"],
                     f"dense-tiny: {comp['bits_per_weight']:.3f} bits per weight; whole file "
                     f"{comp['file_vs_fp16']:.2f}x vs fp16"))
    return {"rows": rows, "speed": speed, "quality": quality, "compression": comp,
            "bench_model": (config or BENCH_MODEL).to_dict(), "device": str(device)}


def goals_text(result: dict) -> str:
    """The goal rows as a Markdown table."""
    from ..report import markdown_table
    rows = [{"what": r["what"], "measured": "n/a" if r["measured"] is None else
             (f"{r['measured']:+.3%}" if "increase" in r["name"] and "over" not in r["name"]
              else f"{r['measured']:.2f}"),
             "goal": f"{r['op']} " + (f"{r['goal']:.1%}" if "bpb_increase" in r["name"] else f"{r['goal']:g}"),
             "met": "n/a" if r["met"] is None else "yes" if r["met"] else "NO", "detail": r["detail"]}
            for r in result["rows"]]
    return markdown_table(rows, {"what": "goal", "measured": "measured:", "goal": "target", "met": "met",
                                 "detail": "from"})
