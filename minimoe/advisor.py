"""A deployment advisor that shows its evidence (claim F2).

The article's advice map says "MoE-first -> DeepSeek, edge -> DeepSeek, cloud -> GPT-4" with nothing behind it. Here
``gather_evidence()`` measures or recomputes the numbers the book's chapters established (quality per FLOP, the
MoE's memory and batch-1 latency overheads, quantization's compression and loss, the scaling trend), and
``advise()`` turns a memory budget, a latency target, a batch size and a hardware choice into an architecture, a
precision and a parallel plan. Each answer lists the facts it used, with the notebook that measures them.

The decision rules are plain and written below; the thresholds in them are choices, the facts are measurements.
"""
from __future__ import annotations

from dataclasses import dataclass, field

HARDWARE = {"CPU": 1, "1 GPU": 1, "8 GPUs": 8}  # devices per choice
HEADROOM = 0.8  # weights may take this share of the memory budget; the rest is for activations and KV cache
LATENCY_BOUND_BATCH = 4  # at or below this batch size, decode is latency-bound (one sequence at a time)


@dataclass(frozen=True)
class Fact:
    value: object
    unit: str
    source: str  # notebook (relative to book/) that measures it
    how: str  # one line: what was measured


@dataclass
class Advice:
    decision: str  # "architecture", "precision", "parallel plan"
    choice: str
    because: str
    facts: list[str] = field(default_factory=list)  # keys of the evidence used


def gather_evidence(n_replies: int = 10) -> dict[str, Fact]:
    """Measure (or read from the zoo's cached runs) every number the advisor uses. Takes seconds once the
    chapters' models are cached. Quality, knowledge, memory, latency and quantization are measured on the
    book-scale models (zoo.BOOK_MODELS, chapter 3); the scaling trend on chapter 6's widths (zoo.SCALING)."""
    from . import scaling, studies, zoo
    from .bench_infer import cache_bytes_per_token, mla_config
    from .evals.scenarios import reply_latencies
    from .report import compare_seeds

    # the book-scale models of chapter 3 (dense and DeepSeekMoE at equal active parameters, three seeds each)
    dense_base, moe_base = zoo.BOOK_MODELS["dense"], zoo.BOOK_MODELS["DeepSeekMoE"]
    cmp = compare_seeds(studies.final_losses(dense_base), studies.final_losses(moe_base), ("dense", "MoE"))
    know = compare_seeds([studies.suite_scores(n)["knowledge"].score for n in zoo.seed_names(dense_base)],
                         [studies.suite_scores(n)["knowledge"].score for n in zoo.seed_names(moe_base)],
                         ("dense", "MoE"))
    dense, moe = zoo.load(dense_base, progress=False).model.eval(), zoo.load(moe_base, progress=False).model.eval()
    lat = reply_latencies({"dense": dense, "MoE": moe}, n_replies=n_replies)
    fits = {f: scaling.bootstrap(scaling.scaling_points(f)) for f in zoo.SCALING}
    top = max(p["flops"] for p in scaling.scaling_points("dense"))
    adv = scaling.moe_advantage(fits["dense"], fits["MoE"], [top])[:, 0]
    cfg = dense.config
    higher = {"tie": "tie", "dense lower": "MoE higher", "MoE lower": "dense higher"}[know["verdict"]]
    e = {
        "quality per FLOP": Fact(cmp["verdict"], "", "03-evaluation/01-capability-suite.ipynb",
                                 f"book scale, final validation loss, 3 seeds each: dense {cmp['mean_a']:.3f}, "
                                 f"DeepSeekMoE {cmp['mean_b']:.3f} (spread {cmp['spread']:.3f})"),
        "knowledge, MoE vs dense": Fact(higher, "", "03-evaluation/01-capability-suite.ipynb",
                                        f"book scale, knowledge score out of 10, 3 seeds each: dense "
                                        f"{know['mean_a']:.2f}, DeepSeekMoE {know['mean_b']:.2f} "
                                        f"(spread {know['spread']:.2f})"),
        "MoE stored / active": Fact(moe.num_parameters() / moe.num_active_parameters(), "x",
                                    "01-architecture/03-deepseekmoe.ipynb",
                                    f"{moe.num_parameters():,} stored, {moe.num_active_parameters():,} active"),
        "MoE / dense latency, batch 1": Fact(lat["MoE"]["p50_ms"] / lat["dense"]["p50_ms"], "x",
                                             "04-applications/02-scenario-matrix.ipynb",
                                             f"median reply time {lat['MoE']['p50_ms']:.1f} vs "
                                             f"{lat['dense']['p50_ms']:.1f} ms, measured now"),
        "MLA / MHA cache bytes": Fact(cache_bytes_per_token(mla_config(cfg)) / cache_bytes_per_token(cfg), "x",
                                      "03-evaluation/02-inference-benchmark.ipynb",
                                      "KV-cache bytes per token, counted from the configurations"),
        "MoE advantage at our largest compute": Fact(tuple(float(v) for v in adv), "share of dense loss",
                                                     "06-outlook/01-scaling.ipynb",
                                                     "1 - L_MoE / L_dense from the fitted power laws: 2.5%, 50%, "
                                                     "97.5% over the seed bootstrap"),
    }
    e.update(_quant_evidence(dense_base))
    return e


def _quant_evidence(name: str) -> dict[str, Fact]:
    """Bits per weight from saved bytes and the bits-per-byte change of int8 and int4, on one zoo model."""
    from . import quant, zoo
    from .data import corpus_splits
    from .quant.bench import compression, lm_metrics

    entry = zoo.load(name, progress=False)
    _, val = corpus_splits(zoo.recipe(name).corpus)
    base = lm_metrics(entry.model, val, max_batches=8)["bpb"]
    out = {}
    for bits, group in ((8, None), (4, 32)):
        q = quant.quantize(entry.model, bits, group_size=group)
        c = compression(q)
        bpb = lm_metrics(q, val, max_batches=8)["bpb"]
        label = f"int{bits}" + (f" g{group}" if group else "")
        out[f"{label} bits per weight"] = Fact(c["bits_per_weight"], "bits", "05-deployment/02-quantization.ipynb",
                                               "from the saved safetensors bytes of the quantized layers")
        out[f"{label} bpb change"] = Fact(bpb / base - 1, "relative", "05-deployment/02-quantization.ipynb",
                                          f"validation bits per byte {base:.3f} -> {bpb:.3f}")
    return out


# the measured fact behind each quantized precision's bits per weight
BITS_FACT = {"int8": "int8 bits per weight", "int4": "int4 g32 bits per weight"}


def _bits(e: dict[str, Fact]) -> dict[str, float]:
    return {"fp32": 32.0, "bf16": 16.0, **{p: float(e[k].value) for p, k in BITS_FACT.items()}}


def advise(e: dict[str, Fact], memory_gb: float, latency_ms: float, batch_size: int, hardware: str,
           active_params_b: float = 7.0) -> list[Advice]:
    """Architecture, precision and parallel plan for a model with `active_params_b` billion active parameters.

    Rules: (1) latency-bound serving (batch <= LATENCY_BOUND_BATCH or a target under 50 ms/token) takes the dense
    model when the measured MoE batch-1 overhead is above 1 and quality per FLOP is not better for the MoE;
    throughput-bound serving takes the MoE when the scaling fit's MoE advantage is positive beyond its
    bootstrap band, or when the MoE reaches a lower loss at equal FLOPs beyond the seed spread. (2) The precision
    is the highest whose weights fit HEADROOM of the memory (at most bf16 on GPUs, whose tensor cores run it
    natively; fp32 only on a CPU). (3) If the weights
    fit one device, replicate (data parallel); otherwise split: expert parallel for an MoE, tensor parallel for a
    dense model, over the devices the hardware has.
    """
    if hardware not in HARDWARE:
        raise ValueError(f"hardware must be one of {list(HARDWARE)}, got {hardware!r}")
    if memory_gb <= 0 or latency_ms <= 0 or batch_size < 1 or active_params_b <= 0:
        raise ValueError("memory_gb, latency_ms and active_params_b must be > 0 and batch_size >= 1")
    advice = []
    overhead = float(e["MoE / dense latency, batch 1"].value)
    moe_gain_low = e["MoE advantage at our largest compute"].value[0]
    latency_bound = batch_size <= LATENCY_BOUND_BATCH or latency_ms < 50
    if latency_bound:
        moe = overhead < 1 and e["quality per FLOP"].value != "dense lower"
        why = (f"latency-bound; the MoE's batch-1 time is {overhead:.2f}x the dense model's"
               + (" and quality per FLOP is a tie" if e["quality per FLOP"].value == "tie" else ""))
        facts = ["MoE / dense latency, batch 1", "quality per FLOP", "knowledge, MoE vs dense"]
    else:
        lower_loss = e["quality per FLOP"].value == "MoE lower"
        moe = moe_gain_low > 0 or lower_loss
        why = ("throughput-bound; the fitted MoE advantage at our largest compute is "
               + ("positive" if moe_gain_low > 0 else "not positive") + f" at the low end of its band "
               f"({moe_gain_low:+.1%})" + ("; at equal FLOPs the MoE reaches a lower loss beyond the seed spread"
                                           if lower_loss else ""))
        facts = ["MoE advantage at our largest compute", "quality per FLOP", "knowledge, MoE vs dense"]
    facts = [k for k in facts if k in e]  # evidence without a knowledge comparison still advises
    arch = "MoE" if moe else "dense"
    stored = active_params_b * (float(e["MoE stored / active"].value) if moe else 1.0)
    advice.append(Advice("architecture", arch, why, facts + (["MoE stored / active"] if moe else [])))

    budget_bits = memory_gb * HEADROOM * 8e9
    candidates = {p: b for p, b in _bits(e).items() if hardware == "CPU" or p != "fp32"}  # GPUs serve in bf16
    fitting = [(p, b) for p, b in candidates.items() if stored * 1e9 * b <= budget_bits]
    if fitting:
        precision, bits = fitting[0]
        gb = stored * bits / 8
        extra = {"int8": "int8 bpb change", "int4": "int4 g32 bpb change"}.get(precision)
        cost = f"; measured bpb change {float(e[extra].value):+.1%}" if extra else ""
        advice.append(Advice("precision", precision, f"{stored:.1f}B stored parameters at {bits:.2f} bits = "
                             f"{gb:.1f} GB fits {HEADROOM:.0%} of {memory_gb:g} GB{cost}",
                             [k for k in (BITS_FACT.get(precision), extra) if k and k in e]
                             or ["MoE stored / active"]))
    else:
        precision, bits = "int4", _bits(e)["int4"]
        advice.append(Advice("precision", "does not fit", f"even int4 needs {stored * bits / 8:.1f} GB; "
                             f"the budget allows {memory_gb * HEADROOM:.1f} GB for weights", [BITS_FACT["int4"]]))
    devices = HARDWARE[hardware]
    per_device_gb = memory_gb / devices
    weights_gb = stored * bits / 8
    if devices == 1:
        plan = "single device"
        why = "one device" + ("" if weights_gb <= per_device_gb * HEADROOM else "; the weights do not fit it")
    elif weights_gb <= per_device_gb * HEADROOM:
        plan, why = f"data parallel x{devices}", "the weights fit one device: replicas, one all-reduce per step"
    else:
        plan = f"expert parallel x{devices}" if moe else f"tensor parallel x{devices}"
        why = f"{weights_gb:.1f} GB of weights exceed one device's {per_device_gb * HEADROOM:.1f} GB"
    advice.append(Advice("parallel plan", plan, why + " (each scheme equals one process: chapter 2)", []))
    return advice


def advice_rows(e: dict[str, Fact], settings: list[dict]) -> list[dict]:
    """A table row per setting: the inputs and the three choices."""
    rows = []
    for s in settings:
        a = {x.decision: x.choice for x in advise(e, **s)}
        rows.append({**s, **a})
    return rows


def advisor_widget(e: dict[str, Fact]):
    """ipywidgets: sliders and a dropdown in, the advice and the facts behind it out.

    The advice is shown as HTML, not Markdown: a page saved with its widgets (the built book, read offline)
    renders an Output widget's HTML but shows Markdown as raw text. Sources are named, not linked: a link
    relative to the notebook would be wrong in the built book, where pages are .html files."""
    import html

    import ipywidgets as w
    from IPython.display import HTML, display

    memory = w.FloatLogSlider(value=24, base=2, min=0, max=10, description="memory (GB)")
    latency = w.FloatLogSlider(value=100, base=10, min=0, max=3, description="ms / token")
    batch = w.IntSlider(value=1, min=1, max=256, description="batch size")
    hardware = w.Dropdown(options=list(HARDWARE), value="1 GPU", description="hardware")
    params = w.FloatLogSlider(value=7, base=10, min=-1, max=3, description="active (B)")
    out = w.Output()

    def show(*_):
        with out:
            out.clear_output()
            items = []
            for a in advise(e, memory.value, latency.value, batch.value, hardware.value, params.value):
                facts = "".join(f"<li>{html.escape(k)}: {html.escape(_fmt(e[k]))} (measured in "
                                f"<code>{html.escape(e[k].source)}</code>)</li>" for k in a.facts)
                items.append(f"<p><b>{html.escape(a.decision)}: {html.escape(a.choice)}</b>: "
                             f"{html.escape(a.because)}</p><ul>{facts}</ul>")
            display(HTML("".join(items)))

    for control in (memory, latency, batch, hardware, params):
        control.observe(show, names="value")
    show()
    return w.VBox([w.HBox([memory, latency, batch]), w.HBox([hardware, params]), out])


def _fmt(f: Fact) -> str:
    v = f.value
    if f.unit == "relative":
        return f"{v:+.2%}"
    if isinstance(v, float):
        return f"{v:.3g} {f.unit}".strip()
    if isinstance(v, tuple):
        return ", ".join(f"{x:+.1%}" for x in v)
    return str(v)
