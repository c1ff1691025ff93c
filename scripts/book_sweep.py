"""The size sweep behind the book-scale models (zoo.BOOK_WIDTH): which width learns the suite's tasks best within
the same CPU time? `python scripts/book_sweep.py --width 128 [--budget-s 150] [--threads 1]`.

Each run trains a dense book model (zoo.book_model) of the given width on the book corpus for as many steps of
8,192 tokens as fit the time budget at the throughput measured on this machine first, with the book recipe's
learning rate, warm-up and mixture, then scores it with the capability suite (100 items per axis). The record
goes to book/03-evaluation/book-sweep/dense-d<width>-l<layers>.json; the chapter-3 text and zoo.py cite those files.
"""
import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from minimoe import evals, zoo
from minimoe.config import ModelConfig
from minimoe.data import corpus_splits
from minimoe.model import MiniLM
from minimoe.train import TrainConfig, train


def throughput(cfg: ModelConfig, batch: int, seq: int, steps: int = 4) -> float:
    """Training tokens per second of one AdamW step on random bytes (the best of steps - 1 after a warm-up)."""
    model = MiniLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randint(0, 256, (batch, seq + 1))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(x[:, :-1], targets=x[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return batch * seq / min(times[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-items", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "book" / "03-evaluation" / "book-sweep"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = zoo.book_model(args.width, "dense", args.layers)
    cfg = ModelConfig.from_dict(model)
    tb = zoo.BOOK_TRAIN
    tps = throughput(cfg, tb["batch_size"], tb["seq_len"])
    steps = max(100, int(args.budget_s * tps / (tb["batch_size"] * tb["seq_len"])))
    tc = TrainConfig.from_dict({**tb, "steps": steps, "warmup_steps": min(tb["warmup_steps"], steps // 10),
                                "eval_every": max(1, steps // 4), "seed": 0, "device": "cpu"})
    start = time.perf_counter()
    result = train(cfg, tc, data=corpus_splits("book"), progress=False)
    wall = time.perf_counter() - start
    scores = evals.evaluate_suite(result.model.eval(), n=args.n_items)
    last = result.history["eval"][-1]
    record = {
        "width": args.width, "layers": args.layers, "params": sum(p.numel() for p in result.model.parameters()),
        "threads": args.threads, "budget_s": args.budget_s, "measured_tokens_per_s": round(tps),
        "steps": steps, "tokens": steps * tb["batch_size"] * tb["seq_len"], "train_wall_s": round(wall, 1),
        "val_loss": last["val_loss"], "val_loss_by_domain": last.get("val_loss_by_domain"),
        "suite": {a: {"score": r.score, "ci": list(r.score_ci), "accuracy": r.value} for a, r in scores.items()},
        "n_items": args.n_items, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(), "recipe": {"model": model, "train": tc.to_dict()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"dense-d{args.width}-l{args.layers}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(path, json.dumps({a: round(v["score"], 2) for a, v in record["suite"].items()}), f"{wall:.0f}s")


if __name__ == "__main__":
    main()
