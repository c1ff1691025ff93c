"""The source article's architecture table (claim A3), rebuilt from five models we can count and time.

The article (section 1) tabulates, for DeepSeek / GPT-4 / Claude / PaLM-2, an "expert dynamism", a
"parameter utilization", a "single-layer latency" and a "memory per expert" (or per path), with no model
sizes, hardware or batch. This module builds five small models of (nearly) EQUAL ACTIVE SIZE, so that
each row of the table can be measured under stated conditions instead of asserted:

    dense         SwiGLU MLP in every layer, the yardstick (Touvron et al., 2023)
    softmax-top2  8 experts of half width, softmax top-2 (GShard, Lepikhin et al., 2020; Mixtral, Jiang et al., 2024)
    deepseekmoe   64 fine-grained experts of 1/8 width, top-6 + 2 shared experts (DeepSeekMoE, Dai et al., 2024,
                  arXiv 2401.06066), DeepSeek-V3's sigmoid router with bias balancing, group-limited routing
                  and a dense first layer (DeepSeek-AI, 2024, arXiv 2412.19437)
    hash          8 full-width experts, top-1 by a fixed token-id table (Roller et al., 2021)
    task          8 half-width experts, top-2 inside the 4 experts a task owns (task-level MoE, Kudugunta et al.,
                  2021: the article's "static paths")

Every model meets each token with the same matmul weights up to the routers' gates (`flops_per_token` agrees
within about 1%). `architecture_rows` counts and times them; `published_counts` applies the same accounting
to published configurations (DeepSeek-V3, Mixtral 8x7B) as a check that it reproduces their reported
active and total parameters. The notebook book/01-architecture/06-architecture-table.ipynb tells the story.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import kv_cache_bytes_per_token
from .config import ModelConfig
from .device import device_name, median_seconds, resolve_device
from .model import MiniLM
from .moe import MoE

# ---- the article's table (source article, section 1): claims, not facts --------------------------

ARTICLE_COLUMNS = ("DeepSeek", "GPT-4", "Claude", "PaLM-2")
ARTICLE_TABLE = {  # headings translated; the figures exactly as printed
    "expert dynamism": ("real-time adjustment", "fixed periodic update", "no MoE", "static paths"),
    "parameter utilization": (0.83, 0.68, 1.00, 0.75),
    "single-layer latency (ms)": (18, 22, 25, 20),
    "memory": ("1.2 GB per expert", "1.8 GB per expert", "n/a", "1.5 GB per path"),
}
ARTICLE_UTILIZATION = dict(zip(ARTICLE_COLUMNS, ARTICLE_TABLE["parameter utilization"]))
ARTICLE_LATENCY_MS = dict(zip(ARTICLE_COLUMNS, ARTICLE_TABLE["single-layer latency (ms)"]))
ARTICLE_GB_PER_EXPERT = {"DeepSeek": 1.2, "GPT-4": 1.8}
ARTICLE_GB_PER_PATH = {"PaLM-2": 1.5}

# ---- five models of equal active size ------------------------------------------------------------

D_MODEL, N_LAYERS, N_HEADS, MAX_SEQ_LEN = 256, 4, 4, 256
D_FF = 1024  # the dense SwiGLU width; every MoE below activates exactly this much expert width per token
_BASE = dict(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, max_seq_len=MAX_SEQ_LEN, d_ff=D_FF)


@dataclass(frozen=True)
class Architecture:
    """One row of the table: a name, how its experts are chosen, and the ModelConfig fields that build it."""

    name: str
    routing: str        # the article's "expert dynamism", said factually
    article_column: str  # the article's column this model stands in for ("" when none)
    reference: str       # the published design it follows
    fields: dict = field(default_factory=dict)

    def config(self) -> ModelConfig:
        """A fresh ModelConfig (configs are mutable; the table's entries must not be)."""
        return ModelConfig(**{**_BASE, **self.fields, "extra": {"architecture": self.name}})


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("dense", "none: no experts, every weight meets every token", "Claude",
                 "Llama-style dense Transformer (Touvron et al., 2023)", {}),
    Architecture("softmax-top2", "learned per token (softmax gate, top-2 of 8)", "GPT-4",
                 "GShard (Lepikhin et al., 2020), Mixtral (Jiang et al., 2024)",
                 dict(n_experts=8, top_k=2, moe_d_ff=D_FF // 2, router="softmax")),
    Architecture("deepseekmoe", "learned per token + bias balancing adjusted every step (top-6 of 64, "
                 "+2 shared)", "DeepSeek",
                 "DeepSeekMoE (Dai et al., 2024); router, group limit and dense first layer of DeepSeek-V3 "
                 "(DeepSeek-AI, 2024)",
                 dict(n_experts=64, top_k=6, n_shared_experts=2, moe_d_ff=D_FF // 8, router="deepseek",
                      n_group=8, topk_group=4, first_dense_layers=1)),
    Architecture("hash", "fixed by token id (hash table, top-1 of 8, nothing learned)", "",
                 "Hash layers (Roller et al., 2021)",
                 dict(n_experts=8, top_k=1, moe_d_ff=D_FF, router="hash")),
    Architecture("task", "fixed by task id (path of 4 experts), learned top-2 inside it", "PaLM-2",
                 "task-level MoE (Kudugunta et al., 2021)",
                 dict(n_experts=8, top_k=2, moe_d_ff=D_FF // 2, router="task", n_tasks=2)),
)}


# ---- counting ------------------------------------------------------------------------------------

def expert_parameters(cfg: ModelConfig) -> int:
    """Weights of one routed SwiGLU expert: gate, up and down projections, 3 * d_model * moe_d_ff (0 if dense)."""
    return 3 * cfg.d_model * cfg.moe_d_ff if cfg.n_experts else 0


def utilization(model: MiniLM) -> float:
    """The fraction of the weights that touch a token: num_active_parameters / num_parameters (1 if dense)."""
    return model.num_active_parameters() / model.num_parameters()


def routed_utilization(cfg: ModelConfig) -> float | None:
    """top_k / n_experts: the fraction of a layer's ROUTED experts a token uses (None for a dense model)."""
    return cfg.top_k / cfg.n_experts if cfg.n_experts else None


def path_parameters(model: MiniLM, task: int = 0) -> int:
    """Parameters a task-routed model needs to serve one task: everything except, in every MoE layer, the
    experts (and their gate rows) that other tasks own. Equals `model.extract_task(task).num_parameters()`."""
    cfg = model.config
    if not (cfg.n_experts and cfg.router == "task"):
        raise ValueError("path_parameters needs a task-routed MoE model (router='task', n_experts > 0)")
    if not isinstance(task, int) or not 0 <= task < cfg.n_tasks:
        raise ValueError(f"task must be an integer in [0, n_tasks={cfg.n_tasks}), got {task!r}")
    unreachable = cfg.n_experts - cfg.n_experts // cfg.n_tasks
    per_layer = unreachable * (expert_parameters(cfg) + cfg.d_model)  # an expert and its row of the gate
    return model.num_parameters() - per_layer * len(model.moe_modules())


# ---- timing --------------------------------------------------------------------------------------

def median_ms(fn, device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on a GPU, see minimoe.device.Timer)."""
    return 1e3 * median_seconds(fn, device, repeats=repeats, warmup=warmup)


def _batch(cfg: ModelConfig, tokens: int, seq_len: int, device, seed: int):
    """`tokens` random token ids as [batch, seq] (seq <= seq_len) and one task id per sequence."""
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    seq = min(seq_len, tokens, cfg.max_seq_len)
    batch = max(1, tokens // seq)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    task_ids = (torch.arange(batch) % cfg.n_tasks).to(device) if cfg.router == "task" and cfg.n_experts else None
    return ids, task_ids


def _last_mlp_input(model: MiniLM, ids, task_ids) -> torch.Tensor:
    """The hidden states the last block's MLP (or MoE) sees on this batch: realistic input for its timing."""
    seen = {}
    block = model.blocks[-1]
    handle = block.mlp_norm.register_forward_hook(lambda mod, inp, out: seen.setdefault("h", out))
    try:
        model(ids, task_ids=task_ids)
    finally:
        handle.remove()
    return seen["h"]


@torch.inference_mode()
def layer_latency_ms(model: MiniLM, tokens: int = 512, seq_len: int = 128, repeats: int = 5, seed: int = 0,
                     ids=None, task_ids=None) -> float:
    """Median ms of ONE forward of the last block's MLP (an MoE layer in every MoE model here) on `tokens`
    tokens: routing, dispatch, experts and combine; forward only, in eval mode, without autograd."""
    model.eval()
    if ids is None:
        ids, task_ids = _batch(model.config, tokens, seq_len, model.device, seed)
    h = _last_mlp_input(model, ids, task_ids)
    mlp = model.blocks[-1].mlp
    if isinstance(mlp, MoE):
        return median_ms(lambda: mlp(h, ids, task_ids), model.device, repeats)
    return median_ms(lambda: mlp(h), model.device, repeats)


@torch.inference_mode()
def model_latency_ms(model: MiniLM, tokens: int = 512, seq_len: int = 128, repeats: int = 5, seed: int = 0,
                     ids=None, task_ids=None) -> float:
    """Median ms of one whole-model forward (embedding to logits) on `tokens` tokens, eval mode, no autograd."""
    model.eval()
    if ids is None:
        ids, task_ids = _batch(model.config, tokens, seq_len, model.device, seed)
    return median_ms(lambda: model(ids, task_ids=task_ids), model.device, repeats)


# ---- the table -----------------------------------------------------------------------------------

ROW_KEYS = ("name", "routing", "article_column", "reference", "n_experts", "top_k", "n_shared_experts",
            "expert_width", "total_params", "active_params", "utilization", "routed_utilization", "flops_per_token",
            "layer_ms", "model_ms", "tokens", "batch", "seq_len", "expert_params", "expert_bytes_fp32",
            "expert_bytes_bf16", "path_params", "path_bytes_fp32", "path_bytes_bf16", "kv_bytes_per_token",
            "model_bytes_fp32", "model_bytes_bf16", "device")


def build_model(name: str, device="auto", seed: int = 0) -> MiniLM:
    """The named architecture of ARCHITECTURES, freshly initialised (seeded), in eval mode on `device`."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {list(ARCHITECTURES)}")
    torch.manual_seed(seed)
    return MiniLM(ARCHITECTURES[name].config()).to(resolve_device(device)).eval()


def architecture_row(model: MiniLM, arch: Architecture, tokens: int = 512, seq_len: int = 128,
                     repeats: int = 5, seed: int = 0) -> dict:
    """Counts, bytes and timings of one model (see `architecture_rows` for the keys)."""
    cfg = model.config
    ids, task_ids = _batch(cfg, tokens, seq_len, model.device, seed)
    total, active = model.num_parameters(), model.num_active_parameters()
    expert = expert_parameters(cfg)
    path = path_parameters(model) if cfg.n_experts and cfg.router == "task" else None
    return {
        "name": arch.name, "routing": arch.routing, "article_column": arch.article_column,
        "reference": arch.reference,
        "n_experts": cfg.n_experts, "top_k": cfg.top_k if cfg.n_experts else None,
        "n_shared_experts": cfg.n_shared_experts, "expert_width": cfg.moe_d_ff if cfg.n_experts else cfg.d_ff,
        "total_params": total, "active_params": active, "utilization": active / total,
        "routed_utilization": routed_utilization(cfg), "flops_per_token": model.flops_per_token(ids.shape[1]),
        "layer_ms": layer_latency_ms(model, repeats=repeats, ids=ids, task_ids=task_ids),
        "model_ms": model_latency_ms(model, repeats=repeats, ids=ids, task_ids=task_ids),
        "tokens": ids.numel(), "batch": ids.shape[0], "seq_len": ids.shape[1],
        "expert_params": expert or None,
        "expert_bytes_fp32": 4 * expert or None, "expert_bytes_bf16": 2 * expert or None,
        "path_params": path,
        "path_bytes_fp32": 4 * path if path else None, "path_bytes_bf16": 2 * path if path else None,
        "kv_bytes_per_token": kv_cache_bytes_per_token(cfg, torch.float32),
        "model_bytes_fp32": 4 * total, "model_bytes_bf16": 2 * total,
        "device": device_name(model.device),
    }


def architecture_rows(device="auto", tokens: int = 512, repeats: int = 5, seq_len: int = 128, seed: int = 0,
                      names=None) -> list[dict]:
    """One dict per architecture (all of ARCHITECTURES, or `names`), with the keys of ROW_KEYS:

    name, routing ("expert dynamism"), article_column, reference; n_experts, top_k, n_shared_experts, expert_width;
    total_params, active_params, utilization = active / total, routed_utilization = top_k / n_experts;
    flops_per_token (training FLOPs, `MiniLM.flops_per_token`); layer_ms = median ms of the last block's
    MLP/MoE forward and model_ms = median ms of a whole forward, both on `tokens` tokens (batch x seq_len),
    fp32, eval mode, inference mode, `repeats` timed runs after one warm-up; expert_params and bytes of one
    routed expert in fp32 / bf16 (None for dense); path_params and bytes of one task's path (task model
    only); kv_bytes_per_token (fp32, all layers); model_bytes_fp32 / _bf16 (all weights); device.
    Weights are random: counts and timings do not depend on training (routing balance does, a little).
    """
    device = resolve_device(device)
    rows = []
    for name in names or ARCHITECTURES:
        model = build_model(name, device, seed)
        rows.append(architecture_row(model, ARCHITECTURES[name], tokens, seq_len, repeats, seed))
        del model
    return rows


def weights_read(mlp) -> tuple[int, int | None]:
    """(weights the last forward of this MLP or MoE layer had to read, routed experts it used).

    A dense MLP reads all its weights; an MoE layer reads its gate, its shared experts and only the routed
    experts that received at least one token (from `last_tokens_per_expert`). At small batches, reading
    weights from memory rather than arithmetic sets a layer's time. Experts used is None for a dense MLP.
    """
    if not isinstance(mlp, MoE):
        return sum(p.numel() for p in mlp.parameters()), None
    if mlp.last_tokens_per_expert is None:
        raise RuntimeError("weights_read needs a forward pass of the MoE layer first")
    hit = int((mlp.last_tokens_per_expert > 0).sum())
    one = mlp.experts.w_gate_up[0].numel() + mlp.experts.w_down[0].numel()
    always = sum(p.numel() for name, p in mlp.named_parameters() if not name.startswith("experts."))
    return always + hit * one, hit


def latency_sweep(token_counts=(64, 256, 1024), device="auto", repeats: int = 3, seq_len: int = 128,
                  seed: int = 0, names=None) -> list[dict]:
    """The last block's MLP/MoE layer at several batch sizes, one dict per point: name, tokens, layer_ms,
    weights_read (weights the layer read, see `weights_read`) and experts_used (None for dense).

    The article's latencies give no batch; this shows how much a "single-layer latency" depends on one.
    """
    device = resolve_device(device)
    points = []
    for name in names or ARCHITECTURES:
        model = build_model(name, device, seed)
        for n in token_counts:
            ids, task_ids = _batch(model.config, n, seq_len, device, seed)
            ms = layer_latency_ms(model, repeats=repeats, ids=ids, task_ids=task_ids)
            read, used = weights_read(model.blocks[-1].mlp)
            points.append({"name": name, "tokens": ids.numel(), "layer_ms": ms, "weights_read": read,
                           "experts_used": used})
        del model
    return points


# ---- the same accounting for published configurations -------------------------------------------

@dataclass(frozen=True)
class PublishedMoE:
    """The dimensions a parameter count needs, as a model's released configuration states them."""

    name: str
    source: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_dense_layers: int    # leading layers with a dense MLP of width d_ff
    d_ff: int              # dense-layer MLP width (0 when there are none)
    moe_d_ff: int          # one routed (and one shared) expert's width
    n_experts: int
    n_shared_experts: int
    top_k: int
    attention_params: int  # weights of one layer's attention, norms inside attention included
    tie_embeddings: bool
    gate_bias: bool = False  # a per-expert routing bias stored with the weights (DeepSeek-V3's correction bias)
    published_total: float = 0.0
    published_active: float = 0.0
    published_note: str = ""


def mla_attention_params(d_model: int, n_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                         qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int) -> int:
    """Weights of one multi-head latent attention layer (DeepSeek-V2 arXiv 2405.04434 sec. 2.1; V3 eq. 1-11):
    W_dq (+ its RMSNorm) and W_uq, or a full-rank W_q; W_dkv with the shared rotary key W_kr (+ RMSNorm of the
    latent); W_ukv for per-head keys and values; W_o."""
    qk = qk_nope_head_dim + qk_rope_head_dim
    if q_lora_rank is None:
        q = d_model * n_heads * qk
    else:
        q = d_model * q_lora_rank + q_lora_rank + q_lora_rank * n_heads * qk
    kv = d_model * (kv_lora_rank + qk_rope_head_dim) + kv_lora_rank
    kv += kv_lora_rank * n_heads * (qk_nope_head_dim + v_head_dim)
    return q + kv + n_heads * v_head_dim * d_model


def gqa_attention_params(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """Weights of one (grouped-query) attention layer without biases: W_q, W_k, W_v, W_o."""
    return d_model * (n_heads + 2 * n_kv_heads) * head_dim + n_heads * head_dim * d_model


def published_counts(spec: PublishedMoE) -> dict:
    """Total and per-token active parameters of a published MoE config, with the accounting MiniLM uses.

    Per layer: attention + two RMSNorms + a dense SwiGLU (first n_dense_layers) or an MoE layer
    (router gate, n_experts routed experts, n_shared_experts shared ones). Active = total minus the
    (n_experts - top_k) routed experts each MoE layer leaves idle for a token. Also returned: active without
    the input embedding (a lookup, not a matmul; some reports leave it out), and one expert's parameters.
    """
    d = spec.d_model
    expert = 3 * d * spec.moe_d_ff
    n_moe = spec.n_layers - spec.n_dense_layers
    embedding = spec.vocab_size * d
    head = 0 if spec.tie_embeddings else spec.vocab_size * d
    gate = spec.n_experts * d + (spec.n_experts if spec.gate_bias else 0)
    parts = {
        "embedding": embedding, "lm_head": head,
        "attention": spec.n_layers * spec.attention_params,
        "norms": (2 * spec.n_layers + 1) * d,
        "dense_mlp": spec.n_dense_layers * 3 * d * spec.d_ff,
        "router": n_moe * gate,
        "routed_experts": n_moe * spec.n_experts * expert,
        "shared_experts": n_moe * spec.n_shared_experts * expert,
    }
    total = sum(parts.values())
    active = total - n_moe * (spec.n_experts - spec.top_k) * expert
    return {"name": spec.name, "parts": parts, "total": total, "active": active,
            "active_without_input_embedding": active - embedding, "utilization": active / total,
            "expert_params": expert, "n_moe_layers": n_moe,
            "always_on": active - n_moe * spec.top_k * expert,   # everything but the routed experts
            "routed_params_per_expert_slot": n_moe * expert}    # one more routed expert in every MoE layer


DEEPSEEK_V3 = PublishedMoE(
    name="DeepSeek-V3",
    source=("deepseek-ai/DeepSeek-V3, inference/configs/config_671B.json (= the Hugging Face config.json): "
            "vocab 129280, dim 7168, 61 layers of which the first 3 dense (inter_dim 18432), moe_inter_dim 2048, "
            "256 routed + 1 shared experts, 8 active; MLA with 128 heads, q_lora_rank 1536, kv_lora_rank 512, "
            "qk_nope 128, qk_rope 64, v_head 128; untied embeddings"),
    vocab_size=129280, d_model=7168, n_layers=61, n_dense_layers=3, d_ff=18432, moe_d_ff=2048, n_experts=256,
    n_shared_experts=1, top_k=8,
    attention_params=mla_attention_params(7168, 128, 1536, 512, 128, 64, 128),
    tie_embeddings=False, gate_bias=True,
    published_total=671e9, published_active=37e9,
    published_note=("671B total, 37B activated per token (DeepSeek-AI, 2024, arXiv 2412.19437, abstract); "
                    "the repository's README_WEIGHTS.md: 36.6B activated including 0.9B for the output head, "
                    "i.e. without the input embedding; neither counts the multi-token-prediction module "
                    "(11.5B further unique parameters)"),
)

MIXTRAL_8X7B = PublishedMoE(
    name="Mixtral 8x7B",
    source=("mistralai/Mixtral-8x7B-v0.1 config.json: vocab 32000, hidden 4096, 32 layers, intermediate 14336, "
            "8 experts, 2 per token, 32 query heads and 8 key/value heads of dim 128; untied embeddings"),
    vocab_size=32000, d_model=4096, n_layers=32, n_dense_layers=0, d_ff=0, moe_d_ff=14336, n_experts=8,
    n_shared_experts=0, top_k=2, attention_params=gqa_attention_params(4096, 32, 8, 128), tie_embeddings=False,
    published_total=47e9, published_active=13e9,
    published_note="47B parameters, 13B active per token (Jiang et al., 2024, arXiv 2401.04088, abstract)",
)

PUBLISHED = {s.name: s for s in (DEEPSEEK_V3, MIXTRAL_8X7B)}


def experts_for_utilization(counts: dict, top_k: int, target: float) -> float:
    """How many routed experts per layer a model with these layer shapes could have at `target` utilization.

    Keeping everything but the routed experts (counts["always_on"]) and top_k active experts per layer fixed,
    utilization = (A + k s) / (A + E s) with s = counts["routed_params_per_expert_slot"]; solved for E.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target utilization must be in (0, 1], got {target!r}")
    a, s = counts["always_on"], counts["routed_params_per_expert_slot"]
    return ((a + top_k * s) / target - a) / s


def format_bytes(n: float | None) -> str:
    """Decimal units, as the article's "GB" are read here: 1 kB = 1e3 B, 1 MB = 1e6 B, 1 GB = 1e9 B."""
    if n is None:
        return "n/a"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"
