"""Text in, text out: prompt a byte-level MiniLM with a string and get the continuation as a string."""
from __future__ import annotations

import torch

from .data import ByteTokenizer


def sample_text(model, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8, top_k: int | None = None,
                top_p: float | None = None, seed: int = 0, stop_at_eos: bool = True, task: int | None = None) -> str:
    """The model's continuation of `prompt` (without the prompt), cut to the model's context.

    task: the task id for a task-routed model (router="task"), e.g. a domain index.

    The prompt is preceded by <|eos|>: in the training streams every document follows one, so this tells the
    model that a new document starts here. Generation stops at the next <|eos|> (end of that document).
    """
    tok = ByteTokenizer()
    ids = torch.tensor([[tok.eos_id] + tok.encode(prompt)], device=model.device)
    room = model.config.max_seq_len - ids.shape[1]
    if room <= 0:
        raise ValueError(f"the prompt ({ids.shape[1]} tokens) fills the model's context "
                         f"(max_seq_len={model.config.max_seq_len})")
    out = model.generate(ids, min(max_new_tokens, room), temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, eos_id=tok.eos_id if stop_at_eos else None,
                         task_ids=None if task is None else torch.tensor([task], device=model.device))
    return tok.decode(out[0, ids.shape[1]:])
