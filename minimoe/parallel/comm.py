"""Counting what a parallel scheme sends: wrap the torch.distributed collectives and record every call.

    with count_collectives() as log:
        loss = model(x).loss; loss.backward()
    log.wire_bytes()          # bytes this rank put on the wire, by the textbook cost of each operation
    log.by_op()               # {"all_reduce": bytes, ...}

Teaching code in minimoe.parallel calls collectives as ``dist.all_reduce(...)`` (attributes of
torch.distributed), so replacing those attributes while the context is open sees every call. Each call is
recorded with its payload and group size, and `wire_bytes` applies the standard cost per rank of each
operation on a ring (Patarasuk and Yuan 2009; Thakur et al. 2005):

* all_reduce of S bytes over n ranks: 2 (n - 1) / n * S  (reduce-scatter, then all-gather);
* all_gather / reduce_scatter to / from a total of S bytes: (n - 1) / n * S;
* all_to_all: the bytes addressed to the other ranks (its own chunk stays);
* send: S; recv: 0 (the sender pays); broadcast: S from the source (a tree moves S per edge; we count the root's
  share only).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
        "broadcast", "send", "recv", "isend", "irecv")


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


@dataclass
class Call:
    op: str
    payload: int      # bytes of the tensor(s) the call was given (for all_to_all: the input)
    group_size: int
    sent: int         # bytes this rank sends by the operation's cost model


def wire_cost(op: str, payload: int, n: int, own: int = 0) -> float:
    """Bytes one rank sends for `op` on `payload` bytes over `n` ranks (see the module docstring).
    own: for all_to_all, the bytes of the chunk a rank keeps for itself."""
    if n <= 1 and op not in ("send", "isend"):
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n * payload
    if op in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        return (n - 1) / n * payload
    if op == "all_to_all_single":
        return payload - own
    if op in ("send", "isend", "broadcast"):
        return float(payload)
    if op in ("recv", "irecv"):
        return 0.0
    raise ValueError(f"no cost model for {op!r}")


@dataclass
class CommLog:
    calls: list[Call] = field(default_factory=list)

    def wire_bytes(self) -> float:
        return sum(c.sent for c in self.calls)

    def by_op(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.calls:
            out[c.op] = out.get(c.op, 0.0) + c.sent
        return out

    def count(self, op: str | None = None) -> int:
        return sum(1 for c in self.calls if op is None or c.op == op)


def _record(log: CommLog, op: str, real):
    def wrapped(*args, **kwargs):
        group = kwargs.get("group")
        n = dist.get_world_size(group)
        if op in ("all_gather_into_tensor", "all_gather"):  # the output: every rank's share
            name = "output_tensor" if op == "all_gather_into_tensor" else "tensor_list"
            payload = _nbytes(args[0] if args else kwargs[name])
        elif op == "reduce_scatter_tensor":
            payload = _nbytes(args[1] if len(args) > 1 else kwargs["input"])
        elif op == "all_to_all_single":
            inp = args[1] if len(args) > 1 else kwargs["input"]
            payload = _nbytes(inp)
            splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            rank = dist.get_rank(group)
            row = inp[0].numel() * inp.element_size() if inp.dim() and inp.shape[0] else 0
            own = (splits[rank] * row) if splits else payload // n
            log.calls.append(Call(op, payload, n, wire_cost(op, payload, n, own)))
            return real(*args, **kwargs)
        else:
            payload = _nbytes(args[0] if args else kwargs["tensor"])
        log.calls.append(Call(op, payload, n, wire_cost(op, payload, n)))
        return real(*args, **kwargs)
    return wrapped


@contextmanager
def count_collectives():
    """Record every torch.distributed collective called while open (in this process)."""
    log = CommLog()
    saved = {op: getattr(dist, op) for op in _OPS}
    try:
        for op, real in saved.items():
            setattr(dist, op, _record(log, op, real))
        yield log
    finally:
        for op, real in saved.items():
            setattr(dist, op, real)
