"""Which layers get which scheme, and the two entry points: `quantize(model, bits, ...)` and `Quantizer`.

A MiniLM's layers fall into kinds (`layer_kind`): attention projections, dense SwiGLU MLPs, routed experts,
shared experts, routers, and the output head (the embedding table is never quantized; with tied embeddings the
head *is* that table). A policy maps each kind to a `Scheme` or to None (kept in full precision). By default
every attention, MLP and expert weight gets the requested scheme while routers and the embedding/head stay in
full precision: a router's few weights decide which experts run, and its errors flip choices rather than
nudge outputs. `moe_policy()` is the mixed recipe for MoE models: experts in 4 bits (most of the weights, each
used by few tokens), attention and shared experts in 8 bits.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..moe import GroupedExperts
from .formats import Scheme, quantize_rtn
from .gptq import Hessian, gptq_quantize
from .layers import KERNELS, QuantExperts, QuantLinear

KINDS = ("attention", "mlp", "experts", "shared_experts", "router", "lm_head")
KEPT = ("router", "lm_head")  # kinds kept in full precision unless a policy says otherwise


def layer_kind(name: str) -> str:
    """The kind of the module called `name` in a MiniLM (a Linear, or a MoE layer's GroupedExperts)."""
    if name == "lm_head":
        return "lm_head"
    if ".mlp.router." in name:
        return "router"
    if ".attn." in name:
        return "attention"
    if ".mlp.experts" in name:
        return "experts"
    if ".mlp.shared." in name:
        return "shared_experts"
    if ".mlp." in name:
        return "mlp"
    raise ValueError(f"no quantization kind for module {name!r}")


def moe_policy(expert_bits: int = 4, group_size: int | None = 128, other_bits: int = 8,
               activation_quant: bool = False, method: str = "rtn") -> dict:
    """Experts in `expert_bits` (group-wise), attention / dense MLP / shared experts in `other_bits` per
    channel, router and embeddings kept."""
    experts = Scheme(expert_bits, group_size if expert_bits == 4 else None, activation_quant=activation_quant,
                     method=method)
    other = Scheme(other_bits, None if other_bits == 8 else group_size, activation_quant=activation_quant,
                   method=method)
    return {"attention": other, "mlp": other, "shared_experts": other, "experts": experts,
            "router": None, "lm_head": None}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())


def targets(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) of every Linear and GroupedExperts of the model, in forward order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, GroupedExperts) or (isinstance(m, nn.Linear) and not _tied_head(model, name, m)):
            out.append((name, m, layer_kind(name)))
    return out


def _tied_head(model, name, m) -> bool:
    embed = getattr(model, "embed", None)
    return name == "lm_head" and embed is not None and m.weight is embed.weight


def make_policy(bits: int, group_size: int | None = 128, activation_quant: bool = False, method: str = "rtn",
                symmetric: bool = True, policy: dict | None = None) -> dict:
    """{kind: Scheme or None}: `bits` for every kind but routers and the head, then `policy`'s overrides.

    group_size applies to 4-bit weights; 8-bit weights get one scale per output channel (torch's int8 kernel's
    layout, and LLM.int8()'s), so bits=8 accepts only the default group_size (ignored) or None. Group-wise
    8-bit weights are still possible through a policy entry Scheme(8, group_size=...).
    """
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 8 and group_size not in (128, None):
        raise ValueError(f"bits=8 quantizes per output channel; group_size={group_size} applies to 4-bit weights "
                         "(for group-wise 8-bit weights pass policy={kind: Scheme(8, group_size=...)})")
    scheme = Scheme(bits, group_size if bits == 4 else None, symmetric, activation_quant, method)
    full = {kind: (None if kind in KEPT else scheme) for kind in KINDS}
    for kind, s in (policy or {}).items():
        if kind not in KINDS:
            raise ValueError(f"policy key {kind!r} is not a layer kind; kinds: {', '.join(KINDS)}")
        if s is not None and not isinstance(s, Scheme):
            raise ValueError(f"policy[{kind!r}] must be a Scheme or None, got {s!r}")
        full[kind] = s
    return full


def quantize(model: nn.Module, bits: int, group_size: int | None = 128, activation_quant: bool = False,
             method: str = "rtn", *, symmetric: bool = True, policy: dict | None = None,
             calibration: torch.Tensor | None = None, kernel: str = "auto", progress: bool = False) -> nn.Module:
    """A quantized copy of `model` (the model itself is not changed).

    bits: 4 or 8 (weights). group_size: input features per fp16 scale for 4-bit weights (None = per output
    channel; rows it does not divide end with a shorter group, see minimoe.quant.formats). activation_quant:
    round each layer's input to int8 per token at run time. method: "rtn" (round to nearest) or "gptq"
    (error-compensating, from `calibration` token ids [n, seq]; default: 32 windows of the training split of
    the corpus the model was trained on, when it is a zoo model, else of the mixed corpus: `calibration_data`).
    symmetric=False adds an int8 zero point per group.
    policy: {kind: Scheme or None} overrides per layer kind (see `KINDS`, `moe_policy`). kernel: "auto" uses
    torch's packed kernels where the platform has them, "reference" always dequantizes then multiplies.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize needs a torch.nn.Module (a MiniLM), got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError("this model is already quantized: quantize the full-precision model instead (quantizing "
                         "quantized weights again would compound the rounding errors)")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    schemes = make_policy(bits, group_size, activation_quant, method, symmetric, policy)
    qmodel = fresh_copy(model)
    plan = [(name, m, schemes[kind]) for name, m, kind in targets(qmodel) if schemes[kind] is not None]
    for name, m, scheme in plan:  # every bad size is reported before any work is done
        if isinstance(m, GroupedExperts):
            scheme.group(m.d_model, f"{name} (gate/up)")
            scheme.group(m.d_ff, f"{name} (down)")
        else:
            scheme.group(m.in_features, name)
    if any(s.method == "gptq" for _, _, s in plan) and calibration is None:
        calibration = calibration_data(_training_corpus(qmodel), seq_len=min(256, qmodel.config.max_seq_len))
    for name, m, scheme in tqdm(plan, desc=f"quantizing ({method})", disable=not progress):
        if isinstance(m, GroupedExperts):
            new = _quantize_experts(qmodel, name, m, scheme, calibration, kernel)
        elif scheme.method == "gptq":
            H = _capture(qmodel, m, calibration, lambda h, args, out: h.add(args[0]), Hessian(m.in_features))
            qw = gptq_quantize(m.weight, H.value(), scheme, name)
            new = QuantLinear.from_weight(m.weight, scheme, m.bias, name, qw, kernel)
        else:
            new = QuantLinear.from_weight(m.weight, scheme, m.bias, name, kernel=kernel)
        _set_module(qmodel, name, new)
    return qmodel


class Quantizer:
    """The article's listing, made real: Quantizer(bits=4, group_size=128, activation_quant=True).quantize(model).

    Holds the settings of `quantize` (same arguments and defaults) and applies them to any number of models.
    """

    def __init__(self, bits: int = 4, group_size: int | None = 128, activation_quant: bool = False,
                 method: str = "rtn", symmetric: bool = True, policy: dict | None = None,
                 calibration: torch.Tensor | None = None, kernel: str = "auto"):
        make_policy(bits, group_size, activation_quant, method, symmetric, policy)  # fail here, not later
        self.settings = dict(bits=bits, group_size=group_size, activation_quant=activation_quant, method=method,
                             symmetric=symmetric, policy=policy, calibration=calibration, kernel=kernel)

    def quantize(self, model: nn.Module, progress: bool = False) -> nn.Module:
        return quantize(model, **self.settings, progress=progress)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.settings.items() if k != "calibration"}
        return "Quantizer(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def fresh_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of the model's weights and buffers, without what its last forward left behind (an MoE
    layer keeps its last routing, which may hold autograd history that copy.deepcopy refuses to copy).
    Building it leaves the caller's random state alone (checkpoint.fresh_model)."""
    from ..checkpoint import fresh_model
    from ..model import MiniLM
    if isinstance(model, MiniLM):
        p = model.embed.weight
        new = fresh_model(model.config).to(device=p.device, dtype=p.dtype)
        new.load_state_dict(model.state_dict())
        return new.eval()
    return copy.deepcopy(model).eval()


def set_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Switch every quantized layer of `model` to `kernel` ("auto" or "reference"), in place; returns model."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel
    return model


def calibration_data(corpus: str = "mixed", n: int = 32, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    """n windows of seq_len token ids [n, seq_len] from a built-in corpus's *training* split (never the
    validation text the book evaluates on), one domain after another as `sample_batch` draws them."""
    import numpy as np

    from ..data import corpus_splits
    train, _ = corpus_splits(corpus)
    x, _ = train.sample_batch(n, seq_len, np.random.default_rng(seed))
    return x


def _training_corpus(model) -> str:
    """The built-in corpus a zoo model was trained on (its config names the recipe); "mixed" otherwise."""
    from .. import zoo
    name = getattr(getattr(model, "config", None), "extra", {}).get("recipe")
    return zoo.RECIPES[name].corpus if name in zoo.RECIPES else "mixed"


# ---- GPTQ's calibration passes ------------------------------------------------------------------

class _Captured(Exception):
    """Raised by a capture hook: the inputs it needs are recorded, the rest of the forward is not."""


@torch.no_grad()
def _capture(model, module, calibration, record, state, batch_size: int = 8):
    """Run the calibration token ids through `model` and call record(state, args, kwargs) with the inputs of
    `module` on each batch, stopping each forward there. Layers before `module` are already quantized, so the
    statistics are those of the inputs the quantized model will really feed it (GPTQ's sequential order)."""
    def hook(mod, args, kwargs):
        record(state, args, kwargs)
        raise _Captured
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in calibration.split(batch_size):
            try:
                model(x.to(model.device))
            except _Captured:
                pass
    finally:
        handle.remove()
    return state


def _quantize_experts(model, name, experts: GroupedExperts, scheme: Scheme, calibration, kernel) -> QuantExperts:
    """Quantize each expert's [Wg | Wu] and Wd; with GPTQ, each from the tokens the router sends it."""
    E = experts.n_experts
    q = QuantExperts(E, experts.d_model, experts.d_ff, scheme, name, kernel).to(experts.w_gate_up.device)
    w_gate_up = experts.w_gate_up.detach().transpose(1, 2)  # [E, 2 d_ff, d_model], nn.Linear's layout
    w_down = experts.w_down.detach().transpose(1, 2)        # [E, d_model, d_ff]
    if scheme.method != "gptq":
        for e in range(E):
            q.gate_up[e].load_quantized(quantize_rtn(w_gate_up[e], scheme, f"{name}.gate_up.{e}"))
            q.down[e].load_quantized(quantize_rtn(w_down[e], scheme, f"{name}.down.{e}"))
        return q

    def solve(weight, hessian, what):  # an expert no calibration token reached has no statistics: RTN
        if hessian.n == 0:
            return quantize_rtn(weight, scheme, what)
        return gptq_quantize(weight, hessian.value(), scheme, what)

    def rows(args):  # (x_sorted, counts, weights) -> per-expert blocks of x and of the combine weights
        x, counts = args[0], args[1]
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        w = args[2] if len(args) > 2 and args[2] is not None else None
        return x.split(counts), (w.split(counts) if w is not None else [None] * E)

    def gate_up_inputs(hs, args, kwargs):
        for e, (xe, _) in enumerate(zip(*rows(args))):
            hs[e].add(xe)

    hs = _capture(model, experts, calibration, gate_up_inputs, [Hessian(experts.d_model) for _ in range(E)])
    for e in range(E):
        q.gate_up[e].load_quantized(solve(w_gate_up[e], hs[e], f"{name}.gate_up.{e}"))

    def down_inputs(hs, args, kwargs):  # what the down projection reads once gate/up are quantized
        for e, (xe, we) in enumerate(zip(*rows(args))):
            if xe.shape[0]:
                gate, up = q.gate_up[e](xe).chunk(2, dim=-1)
                h = torch.nn.functional.silu(gate) * up
                hs[e].add(h if we is None else h * we[:, None])

    hs = _capture(model, experts, calibration, down_inputs, [Hessian(experts.d_ff) for _ in range(E)])
    for e in range(E):
        q.down[e].load_quantized(solve(w_down[e], hs[e], f"{name}.down.{e}"))
    return q


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
