"""MiniLM: token embedding -> n_layers x (attention + MLP, pre-norm residual) -> RMSNorm -> vocabulary logits.

The dense model is Llama-shaped (Touvron et al., 2023): RMSNorm, rotary positions, SwiGLU, optional
grouped-query attention, optionally tied input/output embeddings. With n_experts > 0 the MLP of every layer
after the first `first_dense_layers` is a Mixture-of-Experts (minimoe.moe), and attention="mla" swaps in
DeepSeek's multi-head latent attention: the DeepSeek-V3 layout, at any size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attention as attention_lib
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .moe import MoE, build_moe, max_violation, pooled_balance_loss


@dataclass
class ModelOutput:
    logits: torch.Tensor            # [batch, seq, vocab] (float)
    aux_loss: torch.Tensor          # scalar: load-balancing losses of MoE layers; 0 for a dense model
    loss: torch.Tensor | None = None  # mean next-token cross-entropy when targets are given


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); the mlp is a SwiGLU or a Mixture-of-Experts."""

    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_rounding)
        attention = attention_lib.MultiHeadLatentAttention if cfg.attention == "mla" else \
            attention_lib.CausalSelfAttention
        self.attn = attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_rounding)
        self.mlp = build_moe(cfg) if moe else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cache=None, token_ids=None, task_ids=None):
        x = x + self.attn(self.attn_norm(x), cache)
        h = self.mlp_norm(x)
        return x + (self.mlp(h, token_ids, task_ids) if isinstance(self.mlp, MoE) else self.mlp(h))


class Cache:
    """One KV cache per layer, built by each layer's attention (so other attention kinds bring their own)."""

    def __init__(self, model: "MiniLM", batch: int, max_len: int):
        if max_len > model.config.max_seq_len:  # rotary tables end there: later positions would be garbage
            raise ValueError(f"a cache of max_len={max_len} exceeds the model's max_seq_len="
                             f"{model.config.max_seq_len}")
        p = model.embed.weight
        self.layers = [blk.attn.new_cache(batch, max_len, p.device, p.dtype) for blk in model.blocks]
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class MiniLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"MiniLM needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        moe_layers = set(config.moe_layers)
        self.blocks = nn.ModuleList(Block(config, moe=i in moe_layers) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.norm_rounding)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection shrinks with depth,
        # so the residual stream's variance stays O(1) however many layers add to it.
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight", "shared.down.weight", "experts.w_down")):
                nn.init.normal_(p, 0.0, config.init_std / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)
        elif isinstance(module, MoE):  # stacked expert weights are plain Parameters, not nn.Linear
            nn.init.normal_(module.experts.w_gate_up, 0.0, self.config.init_std)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: Cache | None = None, task_ids: torch.Tensor | None = None,
                _checked: bool = False) -> ModelOutput:
        """input_ids: LongTensor [batch, seq]. targets (optional): [batch, seq], -100 = ignore.

        task_ids: [batch] (or [batch, seq]) task of each sequence, for router="task" models (optional when
        the model has a single task). aux_loss is the weighted sum of the MoE layers' balancing losses; with
        aux_loss_pooling="all_layers" the Switch loss is one loss pooled over all MoE layers (transformers').
        """
        if not _checked:  # generate() checks the prompt once; the tokens it adds are valid by construction
            self._check_input(input_ids, cache)
            task_ids = self._check_task_ids(task_ids, input_ids)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None, input_ids, task_ids)
        logits = self.lm_head(self.norm(x))
        aux_loss = logits.new_zeros((), dtype=torch.float32)
        cfg = self.config
        if cfg.aux_loss_coef or cfg.z_loss_coef or cfg.seq_aux_loss_coef:
            moes = self.moe_modules()
            pooled = cfg.aux_loss_pooling == "all_layers"
            for moe in moes:
                per_layer_coef = 0.0 if pooled else cfg.aux_loss_coef
                aux_loss = aux_loss + moe.balance_loss(per_layer_coef, cfg.z_loss_coef, cfg.seq_aux_loss_coef)
            if pooled and cfg.aux_loss_coef and moes:
                outs = [moe.last_router_output for moe in moes]
                aux_loss = aux_loss + cfg.aux_loss_coef * pooled_balance_loss(
                    [r.scores for r in outs], [r.experts for r in outs], cfg.n_experts)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return ModelOutput(logits=logits, aux_loss=aux_loss, loss=loss)

    def _check_input(self, input_ids, cache) -> None:
        """Clear errors for the mistakes that otherwise surface as index errors deep inside torch."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.LongTensor [batch, seq], got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq], got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids (torch.long), got {input_ids.dtype}")
        past = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if past + input_ids.shape[1] > limit:
            raise ValueError(f"sequence of {past + input_ids.shape[1]} tokens is longer than the model's "
                             f"context (max_seq_len={limit})")
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def _check_task_ids(self, task_ids, input_ids):
        if not self.config.n_experts or self.config.router != "task":
            return task_ids
        n_tasks = self.config.n_tasks
        if task_ids is None:
            if n_tasks == 1:
                return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            raise ValueError(f"task_ids is required: this model routes by task (router='task', n_tasks={n_tasks}); "
                             "pass one task id per sequence")
        task_ids = torch.as_tensor(task_ids, device=input_ids.device)
        if task_ids.dtype not in (torch.int64, torch.int32) or tuple(task_ids.shape) not in (
                (input_ids.shape[0],), tuple(input_ids.shape)):
            raise ValueError(f"task_ids must be integer ids of shape [batch] or [batch, seq], got "
                             f"{task_ids.dtype} {tuple(task_ids.shape)}")
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= n_tasks):
            raise ValueError(f"task_ids must lie in [0, n_tasks={n_tasks}), got {task_ids.tolist()}")
        return task_ids

    # ---- Mixture-of-Experts bookkeeping --------------------------------------------------------
    def moe_modules(self) -> list[MoE]:
        """The MoE layers, in depth order (empty for a dense model)."""
        return [blk.mlp for blk in self.blocks if isinstance(blk.mlp, MoE)]

    def moe_stats(self) -> list[dict]:
        """Per-MoE-layer routing statistics of the last forward (tokens_per_expert, max_vio, ...)."""
        return [moe.stats() for moe in self.moe_modules()]

    @torch.no_grad()
    def finish_step(self) -> dict:
        """Call after each optimizer step: balance DeepSeek routers' biases and report the step's load.

        Returns {"max_vio": mean over MoE layers of MaxVio of the load the step's micro-batches routed}
        ({} for a dense model). With router="deepseek", each bias first moves by bias_update_speed towards
        balance (arXiv 2408.15664); it is not a parameter, so no optimizer ever touches it.
        """
        gamma = self.config.bias_update_speed or 0.0
        loads = [load for load in (moe.finish_step(gamma) for moe in self.moe_modules()) if load is not None]
        if not loads:
            return {}
        return {"max_vio": sum(max_violation(load) for load in loads) / len(loads)}

    def extract_task(self, task: int) -> "MiniLM":
        """A smaller MiniLM for one task of a task-routed model: the same outputs on that task's inputs.

        Each MoE layer keeps only the experts task `task` can reach (the block of n_experts // n_tasks it
        owns) and the matching rows of the gate; everything else is copied. This is what path selection
        buys at deployment: a task's model is a fraction of the whole, with no loss on that task.
        With a capacity factor (training mode), capacity = ceil(cf * N * k / E) must keep the full model's E,
        or each kept expert would get n_tasks times its capacity: the config records it in
        extra["from_n_experts"], which `build_moe` divides by. The copy is in the mode (train / eval) of self.
        """
        cfg = self.config
        if not (cfg.n_experts and cfg.router == "task"):
            raise ValueError("extract_task needs a task-routed MoE model (router='task', n_experts > 0)")
        if not isinstance(task, int) or not 0 <= task < cfg.n_tasks:
            raise ValueError(f"task must be an integer in [0, n_tasks={cfg.n_tasks}), got {task!r}")
        block = cfg.n_experts // cfg.n_tasks
        keep = torch.arange(task * block, (task + 1) * block, device=self.device)
        fields = cfg.to_dict()
        fields.update(n_experts=block, n_tasks=1, top_k=cfg.top_k,
                      extra={**cfg.extra, "extracted_task": task,
                             "from_n_experts": cfg.extra.get("from_n_experts", cfg.n_experts)})
        small = MiniLM(ModelConfig.from_dict(fields)).to(device=self.device, dtype=self.embed.weight.dtype)
        state = self.state_dict()
        for name, value in state.items():
            if ".mlp.experts." in name or ".mlp.router.gate." in name:
                state[name] = value.index_select(0, keep)
        small.load_state_dict(state)
        return small.train(self.training)

    # ---- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 use_cache: bool = True, eos_id: int | None = None,
                 task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Return the prompt followed by `max_new_tokens` new tokens ([batch, prompt + new]).

        temperature=0 is greedy (argmax). Otherwise sample from softmax(logits / temperature), restricted to
        the top_k most likely tokens and/or the smallest set with cumulative probability >= top_p (Holtzman
        et al., 2020). `seed` makes sampling reproducible. use_cache=False recomputes the whole sequence at
        every step, which is what the KV cache saves; both compute the same logits (up to rounding) for every
        configuration, since the model runs in eval mode, where MoE layers are dropless (a capacity factor
        applies only in training). Generation stops early once every row emitted eos_id. task_ids: [batch]
        task of each row, for task-routed models.
        """
        squeeze = input_ids.dim() == 1
        ids = input_ids[None] if squeeze else input_ids
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        total = ids.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        ids = ids.to(self.embed.weight.device)
        self._check_input(ids, None)
        task_ids = self._check_task_ids(task_ids, ids)
        if task_ids is not None and task_ids.dim() == 2:
            raise ValueError("generate() takes one task id per row (task_ids of shape [batch])")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=ids.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        cache = Cache(self, ids.shape[0], total) if use_cache else None
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        next_input = ids
        for _ in range(max_new_tokens):
            logits = self(next_input if use_cache else ids, cache=cache, task_ids=task_ids,
                          _checked=True).logits[:, -1, :].float()
            token = _sample(logits, temperature, top_k, top_p, gen)
            if eos_id is not None:
                token = torch.where(finished, torch.full_like(token, eos_id), token)
                finished |= token == eos_id
            ids = torch.cat([ids, token[:, None]], dim=1)
            next_input = token[:, None]
            if eos_id is not None and bool(finished.all()):
                break
        self.train(was_training)
        return ids[0] if squeeze else ids

    # ---- accounting ----------------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied embedding counts once). non_embedding drops the embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def parameter_breakdown(self) -> dict[str, int]:
        """Unique parameters per component: embedding, attention, mlp (dense SwiGLUs), norms, lm_head (when
        untied) and, for MoE models, router, experts (routed) and shared_experts."""
        groups = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
        if self.config.n_experts:
            groups.update(router=0, experts=0, shared_experts=0)
        for name, p in self.named_parameters():  # named_parameters yields a tied tensor once
            key = ("embedding" if name.startswith("embed") else "lm_head" if name.startswith("lm_head")
                   else "attention" if ".attn." in name else "router" if ".mlp.router." in name
                   else "experts" if ".mlp.experts." in name else "shared_experts" if ".mlp.shared." in name
                   else "mlp" if ".mlp." in name else "norms")
            groups[key] += p.numel()
        return groups

    def _inactive_expert_weights(self) -> int:
        """Routed-expert weights a token does not use: (n_experts - top_k) experts in every MoE layer."""
        return sum((moe.n_experts - self.config.top_k) * (moe.experts.w_gate_up[0].numel()
                                                          + moe.experts.w_down[0].numel())
                   for moe in self.moe_modules())

    def num_active_parameters(self) -> int:
        """Parameters that touch each token: all of them for a dense model; for an MoE model the top_k
        routed experts of each MoE layer count, the other n_experts - top_k do not (shared experts,
        attention, router and embeddings always count)."""
        return self.num_parameters() - self._inactive_expert_weights()

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), as in PaLM's appendix B / nanoGPT.

        6 * (matmul weights a token meets: lm_head included, only top_k routed experts per MoE layer)
        + 6 * n_layers * n_heads * (query-key dim + value dim) * seq_len for attention scores and their
        weighted sum (12 * n_layers * n_heads * head_dim * seq_len for MHA; counted without the causal half,
        as PaLM does).
        """
        cfg = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul += sum(moe.experts.w_gate_up.numel() + moe.experts.w_down.numel() for moe in self.moe_modules())
        matmul -= self._inactive_expert_weights()
        if cfg.attention == "mla":
            qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        else:
            qk = v = cfg.head_dim
        return 6 * matmul + 6 * cfg.n_layers * cfg.n_heads * (qk + v) * seq_len

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device


def _sample(logits: torch.Tensor, temperature: float, top_k, top_p, gen) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch]."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep tokens until the mass before them reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]
