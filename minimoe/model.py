"""MiniLM: token embedding -> n_layers x (attention + MLP, pre-norm residual) -> RMSNorm -> vocabulary logits.

The dense model is Llama-shaped (Touvron et al., 2023): RMSNorm, rotary positions, SwiGLU, optional
grouped-query attention, optionally tied input/output embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CausalSelfAttention
from .config import ModelConfig
from .layers import RMSNorm, SwiGLU


@dataclass
class ModelOutput:
    logits: torch.Tensor            # [batch, seq, vocab] (float)
    aux_loss: torch.Tensor          # scalar: load-balancing losses of MoE layers; 0 for a dense model
    loss: torch.Tensor | None = None  # mean next-token cross-entropy when targets are given


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cache=None):
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


class Cache:
    """One KV cache per layer, built by each layer's attention (so other attention kinds bring their own)."""

    def __init__(self, model: "MiniLM", batch: int, max_len: int):
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
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection shrinks with depth,
        # so the residual stream's variance stays O(1) however many layers add to it.
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, config.init_std / math.sqrt(2 * config.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: Cache | None = None, _checked: bool = False) -> ModelOutput:
        """input_ids: LongTensor [batch, seq]. targets (optional): [batch, seq], -100 = ignore."""
        if not _checked:  # generate() checks the prompt once; the tokens it adds are valid by construction
            self._check_input(input_ids, cache)
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layers[i] if cache is not None else None)
        logits = self.lm_head(self.norm(x))
        aux_loss = logits.new_zeros((), dtype=torch.float32)
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

    # ---- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 use_cache: bool = True, eos_id: int | None = None) -> torch.Tensor:
        """Return the prompt followed by `max_new_tokens` new tokens ([batch, prompt + new]).

        temperature=0 is greedy (argmax). Otherwise sample from softmax(logits / temperature), restricted to
        the top_k most likely tokens and/or the smallest set with cumulative probability >= top_p (Holtzman
        et al., 2020). `seed` makes sampling reproducible. use_cache=False recomputes the whole sequence at
        every step, which is what the KV cache saves. Generation stops early once every row emitted eos_id.
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
        gen = None
        if seed is not None:
            gen = torch.Generator(device=ids.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        cache = Cache(self, ids.shape[0], total) if use_cache else None
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        next_input = ids
        for _ in range(max_new_tokens):
            logits = self(next_input if use_cache else ids, cache=cache, _checked=True).logits[:, -1, :].float()
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
        """Unique parameters per component: embedding, attention, mlp, norms (+ lm_head when untied)."""
        groups = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
        seen = set()
        for name, p in self.named_parameters():  # named_parameters yields a tied tensor once
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = ("embedding" if name.startswith("embed") else "lm_head" if name.startswith("lm_head")
                   else "attention" if ".attn." in name else "mlp" if ".mlp." in name else "norms")
            groups[key] += p.numel()
        return groups

    def num_active_parameters(self) -> int:
        """Parameters that touch each token. For a dense model every parameter does."""
        return self.num_parameters()

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), as in PaLM's appendix B / nanoGPT.

        6 * (matmul weights a token meets, lm_head included) + 12 * n_layers * n_heads * head_dim * seq_len
        for attention scores and their weighted sum (counted without the causal half, as PaLM does).
        """
        cfg = self.config
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len

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
