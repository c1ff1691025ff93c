"""Chapter 1's GPU measurements in one run: `python scripts/chapter1_gpu.py OUT.json` on a CUDA machine.

CI has no GPU, so the book cannot execute this; the chapter shows the JSON this script wrote, with the GPU,
torch version and date it records. Everything here is also checked or timed on the CPU by the notebooks.

    1. correctness on CUDA: MoE and MLA models generate the same tokens with and without the KV cache; a
       task path equals the full task-routed model on its task; 20 training steps of a DeepSeekMoE with bias
       balancing stay finite and move the bias;
    2. `minimoe bench moe` rows (CUDA events), fp32 and bf16, forward and forward+backward;
    3. the architecture table's counts and timings (chapter 1, notebook 6) at 512 and 8192 tokens;
    4. decode-step time of one attention layer (MHA, GQA, MLA naive and absorbed) at long contexts, bf16.
"""
from __future__ import annotations

import json
import platform
import sys
import time

import torch

from minimoe import MiniLM, ModelConfig
from minimoe.archtable import architecture_rows
from minimoe.bench_moe import bench_moe, evaluate_goals
from minimoe.data import Document, TokenDataset
from minimoe.kvcache import time_decode_step
from minimoe.model import Block
from minimoe.train import TrainConfig, train


def correctness(device) -> dict:
    torch.manual_seed(0)
    out = {}
    for name, kw in {"moe-deepseek": dict(n_experts=8, top_k=2, router="deepseek", n_shared_experts=1),
                     "mla": dict(attention="mla", q_lora_rank=32)}.items():
        model = MiniLM(ModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **kw)).to(device).eval()
        prompt = torch.randint(0, 256, (3, 7), device=device)
        out[f"{name}: cached == uncached"] = bool(torch.equal(model.generate(prompt, 24, use_cache=True),
                                                              model.generate(prompt, 24, use_cache=False)))
    task = MiniLM(ModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=64, n_experts=8, top_k=2,
                              router="task", n_tasks=2)).to(device).eval()
    ids = torch.randint(0, 256, (2, 16), device=device)
    second_task = torch.ones(2, dtype=torch.long, device=device)
    with torch.inference_mode():
        diff = (task.extract_task(1)(ids).logits - task(ids, task_ids=second_task).logits).abs().max()
    out["task path max |logit diff|"] = float(diff)
    text = "the quick brown fox jumps over the lazy dog. " * 200
    docs = [Document(f"d{i}", dom, text, f"s{i}") for i, dom in enumerate(["code", "prose", "code", "prose"])]
    data = (TokenDataset(docs), TokenDataset(docs))
    cfg = ModelConfig(d_model=64, n_layers=3, n_heads=4, max_seq_len=64, n_experts=16, top_k=4, moe_d_ff=32,
                      n_shared_experts=1, router="deepseek", first_dense_layers=1, bias_update_speed=0.005)
    result = train(cfg, TrainConfig(steps=20, batch_size=8, seq_len=64, eval_every=10, device=str(device)),
                   data=data, progress=False)
    out["train 20 steps: final loss"] = result.history["train"][-1]["loss"]
    out["train 20 steps: bias moved"] = bool(result.model.moe_modules()[0].router.bias.abs().sum() > 0)
    bf16 = train(cfg, TrainConfig(steps=20, batch_size=8, seq_len=64, eval_every=10, device=str(device),
                                  precision="bf16"), data=data, progress=False)
    out["train 20 steps bf16 autocast (grouped_mm experts): final loss"] = bf16.history["train"][-1]["loss"]
    return out


def decode_steps(device, pasts=(1024, 8192, 32768), repeats: int = 20) -> list[dict]:
    rows = []
    base = dict(d_model=1024, n_layers=1, n_heads=16, max_seq_len=32769)
    kinds = {"MHA": dict(), "GQA (4 KV heads)": dict(n_kv_heads=4),
             "MLA": dict(attention="mla", kv_lora_rank=256, qk_rope_head_dim=32, q_lora_rank=384)}
    for kind, kw in kinds.items():
        cfg = ModelConfig(**base, **kw)
        torch.manual_seed(0)
        attn = Block(cfg).attn.to(device=device, dtype=torch.bfloat16).eval()
        steps = {"": None} if cfg.attention != "mla" else {" naive": attn.forward, " absorbed": attn.forward_absorbed}
        for label, step in steps.items():
            for past in pasts:
                t = time_decode_step(attn, batch=8, past=past, step=step, repeats=repeats, device=device)
                rows.append({"attention": kind + label, "past": past, "batch": 8, "dtype": "bf16", **t})
    return rows


def _bench(device) -> dict:
    rows = bench_moe(device=device, impls=("minimoe", "transformers", "dense"), repeats=20, warmup=5)
    return {"rows": rows, "goals": evaluate_goals(rows)}


def main(path: str) -> None:
    device = torch.device("cuda")
    t0 = time.time()
    report = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
              "script": "scripts/chapter1_gpu.py"}
    sections = {
        "correctness": lambda: correctness(device),
        "bench_moe": lambda: _bench(device),
        "architecture": lambda: {str(n): architecture_rows(device=device, tokens=n, repeats=20) for n in (512, 8192)},
        "decode_step": lambda: decode_steps(device),
    }
    for name, run in sections.items():  # one failing section must not cost the others' device time
        try:
            report[name] = run()
        except Exception as e:  # noqa: BLE001 - recorded in the report, and printed
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, json.dumps(report[name], default=str)[:2000], flush=True)
    report["seconds"] = time.time() - t0
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {path} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1])
