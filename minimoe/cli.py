"""The `minimoe` command: train, generate, eval, quantize, zoo, bench.  `minimoe SUBCOMMAND --help` for each."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one clear line on stderr (and exit status 2), not usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _weights(text):
    """"code=2,prose=1" -> {"code": 2.0, "prose": 1.0}; the values are checked by TrainConfig."""
    out = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq or not name.strip():
            raise argparse.ArgumentTypeError(f"expected DOMAIN=WEIGHT pairs separated by commas, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    from .data import CORPORA
    from .train import SCHEDULES
    p = _Parser(prog="minimoe", description="Train, sample and measure small dense and MoE language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model on the built-in corpus or your own text files",
                       description="Train a model; the checkpoint folder gets config.json + model.safetensors.")
    t.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (and resume from)")
    t.add_argument("--recipe", default="dense-tiny", help="zoo recipe whose sizes and settings to start from")
    t.add_argument("--data", nargs="+", type=Path, metavar="PATH",
                   help="your own text files or folders instead of the built-in corpus")
    for name, typ in (("d-model", _positive_int), ("n-layers", _positive_int), ("n-heads", _positive_int),
                      ("n-kv-heads", _positive_int), ("max-seq-len", _positive_int)):
        t.add_argument(f"--{name}", type=typ, help="override the recipe's model size")
    for name, typ in (("steps", _positive_int), ("batch-size", _positive_int), ("seq-len", _positive_int),
                      ("batch-tokens", _positive_int), ("lr", float), ("warmup-steps", int),
                      ("eval-every", _positive_int), ("checkpoint-every", _positive_int), ("seed", int)):
        t.add_argument(f"--{name}", type=typ, help="override the recipe's training setting")
    t.add_argument("--attention", choices=["mha", "mla"], help="mla = DeepSeek's multi-head latent attention")
    for name, typ in (("n-experts", int), ("top-k", _positive_int), ("n-shared-experts", int),
                      ("moe-d-ff", _positive_int), ("first-dense-layers", int), ("n-tasks", _positive_int),
                      ("capacity-factor", float), ("bias-update-speed", float), ("aux-loss-coef", float)):
        t.add_argument(f"--{name}", type=typ, help="override the recipe's Mixture-of-Experts setting "
                                                   "(n-experts 0 = dense)")
    t.add_argument("--router", choices=["softmax", "deepseek", "hash", "task"])
    t.add_argument("--schedule", choices=list(SCHEDULES), help="LR schedule after the linear warm-up")
    t.add_argument("--min-lr-ratio", type=float, help="final LR as a fraction of --lr")
    t.add_argument("--corpus", choices=list(CORPORA), help="built-in corpus (default: the recipe's)")
    mix = t.add_mutually_exclusive_group()
    mix.add_argument("--domain-weights", type=_weights, metavar="D=W,...",
                     help="sampling weight per domain, e.g. code=2,prose=1 (missing domains get 0)")
    mix.add_argument("--mixture-temperature", type=float, metavar="T",
                     help="sample domains in proportion to size ** (1/T): 1 = natural, large = uniform")
    t.add_argument("--precision", choices=["fp32", "bf16"])
    t.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, ...")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--nproc", type=_positive_int,
                   help="data-parallel processes (started with torchrun; gloo on CPU, NCCL on GPUs)")
    t.add_argument("--zero", action="store_true", help="with --nproc: shard AdamW's state across processes (ZeRO-1)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="sample text from a checkpoint folder or a zoo model",
                       description="Continue a prompt with a trained model.")
    g.add_argument("model", help="checkpoint folder, or the name of a zoo model (see `minimoe zoo list`)")
    g.add_argument("--prompt", default="", help="text to continue (default: empty)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=_positive_int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--task", type=int, help="task id, for task-routed models (e.g. moe-tiny-task: 0 code, 1 prose)")
    g.add_argument("--device", default="auto")

    e = sub.add_parser("eval", help="the five-axis capability suite (chapter 3) on a checkpoint or zoo model",
                       description="Score a model on language, reasoning, code, dialogue and knowledge items held "
                                   "out from training: 0-10 per axis with 95% intervals, and the raw metric.")
    e.add_argument("model", help="checkpoint folder, or the name of a zoo model (see `minimoe zoo list`)")
    e.add_argument("--n", type=_positive_int, default=200, help="items per axis")
    e.add_argument("--k", type=_positive_int, default=4, help="candidates per item (chance = 1/k)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--axes", nargs="+", choices=["language", "reasoning", "code", "dialogue", "knowledge"])
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")

    q = sub.add_parser("quantize", help="quantize a checkpoint or zoo model to 8- or 4-bit weights (chapter 5)",
                       description="Write a quantized copy (packed int4/int8 codes, fp16 scales, safetensors) and "
                                   "print its bytes per weight and compression from the saved file; --eval adds "
                                   "held-out bits per byte before and after.")
    q.add_argument("model", help="checkpoint folder, or the name of a zoo model (see `minimoe zoo list`)")
    q.add_argument("--out", required=True, type=Path, help="folder to write the quantized checkpoint to")
    q.add_argument("--bits", type=int, choices=[4, 8], default=4)
    grp = q.add_mutually_exclusive_group()
    grp.add_argument("--group-size", type=_positive_int, default=128,
                     help="input features per scale for 4-bit weights (default 128; 8-bit is per channel)")
    grp.add_argument("--per-channel", action="store_true", help="one scale per output channel")
    q.add_argument("--asymmetric", action="store_true", help="add an int8 zero point per group")
    q.add_argument("--activation-quant", action="store_true", help="round inputs to int8 per token at run time")
    q.add_argument("--method", choices=["rtn", "gptq"], default="rtn",
                   help="round to nearest, or GPTQ (error-compensating, from calibration text)")
    q.add_argument("--policy", choices=["uniform", "moe"], default="uniform",
                   help="moe: experts at --bits, attention and shared experts 8-bit (routers, embeddings kept)")
    q.add_argument("--eval", action="store_true", help="bits per byte and next-byte accuracy before and after")
    q.add_argument("--corpus", help="built-in corpus for --eval and GPTQ calibration (default: the model's own, "
                                    "else mixed)")
    q.add_argument("--device", default="auto")

    z = sub.add_parser("zoo", help="list, train, verify or locate the named models the book uses",
                       description="The zoo: named recipes trained on demand and cached in $MINIMOE_CACHE; "
                                   "book-scale (shipped) recipes are trained once and their weights committed "
                                   "under weights/ ($MINIMOE_WEIGHTS).")
    zsub = z.add_subparsers(dest="zoo_command", required=True, parser_class=_Parser, metavar="ACTION")
    zsub.add_parser("list", help="recipes and whether each is cached (shipped: whether its weights verify)")
    zt = zsub.add_parser("train", help="train a recipe into the cache, or a shipped recipe into weights/",
                         description="Train a recipe into the cache; a shipped (book-scale) recipe is trained from "
                                     "scratch and its bf16 weights and provenance written to weights/NAME/.")
    zt.add_argument("name", nargs="?", help="the recipe (see `minimoe zoo list`)")
    zt.add_argument("--scale", choices=["book"], help="book: every shipped recipe whose weights are missing")
    zt.add_argument("--force", action="store_true", help="retrain even if cached, or replace shipped weights")
    zt.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, ...")
    zt.add_argument("--quiet", action="store_true", help="no progress bar")
    zv = zsub.add_parser("verify", help="check shipped weights against their hashes and recipes",
                         description="Check every shipped recipe's weights (or NAME's): files present, SHA-256 as "
                                     "recorded, trained for the recipe's current key. Exit status 1 on a failure.")
    zv.add_argument("name", nargs="?", help="one shipped recipe (default: all of them)")
    zv.add_argument("--check-steps", type=_positive_int, metavar="N",
                    help="also train the first N steps again on the CPU and compare with the recorded losses")
    zv.add_argument("--rel-tol", type=float, default=0.02,
                    help="relative tolerance of --check-steps (default 0.02, for weights trained on a GPU in bf16)")
    zp = zsub.add_parser("path", help="print a recipe's cache folder (shipped: its weights folder)")
    zp.add_argument("name")

    b = sub.add_parser("bench", help="benchmarks that print ratios measured in one run",
                       description="Training MFU against the measured matmul peak; KV-cache decode speed-up; "
                                   "an MoE layer against a dense layer of equal active FLOPs and transformers.")
    bsub = b.add_subparsers(dest="bench_command", required=True, parser_class=_Parser, metavar="WHAT")
    bt = bsub.add_parser("train", help="training tokens/s and MFU, fp32 and bf16")
    bd = bsub.add_parser("decode", help="generation speed with and without the KV cache")
    from .bench import BENCH_MODEL
    for sp in (bt, bd):
        sp.add_argument("--d-model", type=_positive_int, default=BENCH_MODEL.d_model)
        sp.add_argument("--n-layers", type=_positive_int, default=BENCH_MODEL.n_layers)
        sp.add_argument("--n-heads", type=_positive_int, default=BENCH_MODEL.n_heads)
        sp.add_argument("--device", default="auto")
        sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bt.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    bt.add_argument("--batch-size", type=_positive_int, default=16)
    bt.add_argument("--seq-len", type=_positive_int, default=256)
    bt.add_argument("--steps", type=_positive_int, default=6)
    bd.add_argument("--batch-sizes", nargs="+", type=_positive_int, default=[1, 8])
    bd.add_argument("--prompt-len", type=_positive_int, default=128)
    bd.add_argument("--new-tokens", type=_positive_int, default=128)
    bi = bsub.add_parser("infer", help="time to first token, decode throughput and memory; the article's listing",
                         description="Correct inference benchmark (warm-up, synchronized timing, medians and spread, "
                                     "prefill and decode separately, peak memory) over batch sizes; --reference runs "
                                     "the goals' reference model, --article the article's listing and its defects.")
    bi.add_argument("--model", help="checkpoint folder or zoo model (default: the 6 x 384 reference model, random "
                                    "weights)")
    bi.add_argument("--batch-sizes", nargs="+", type=_positive_int, default=[1, 8])
    bi.add_argument("--prompt-len", type=_positive_int, default=64)
    bi.add_argument("--new-tokens", type=_positive_int, default=64)
    bi.add_argument("--repeats", type=_positive_int, default=5)
    bi.add_argument("--reference", action="store_true", help="the reference run and its goals (minutes on a CPU)")
    bi.add_argument("--article", action="store_true", help="the article's listing as written, and its defects")
    bi.add_argument("--device", default="auto")
    bi.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bq = bsub.add_parser("quant", help="quantized decode speed, bits per byte and bytes against the goals",
                         description="Decode tokens/s of each quantization scheme against fp32 on the benchmark "
                                     "model (round-robin, ratios per round), torch.ao's dynamic int8 beside them; "
                                     "bits per byte of int8, int4 RTN and GPTQ on dense-tiny; compression from bytes.")
    bq.add_argument("--rounds", type=_positive_int, default=5, help="rounds of the round-robin timing")
    bq.add_argument("--prompt-len", type=_positive_int, default=64)
    bq.add_argument("--new-tokens", type=_positive_int, default=64)
    bq.add_argument("--d-model", type=_positive_int, default=BENCH_MODEL.d_model)
    bq.add_argument("--n-layers", type=_positive_int, default=BENCH_MODEL.n_layers)
    bq.add_argument("--n-heads", type=_positive_int, default=BENCH_MODEL.n_heads)
    bq.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's own choice)")
    bq.add_argument("--device", default="cpu")
    bq.add_argument("--json", action="store_true", help="print JSON instead of tables")
    from .bench_moe import CONFIGS, DEFAULT_IMPLS, IMPLS
    bm = bsub.add_parser("moe", help="an MoE layer against a dense SwiGLU of equal active FLOPs and transformers",
                         description="Time one MoE layer, a dense SwiGLU doing the same active FLOPs and transformers' "
                                     "MoE blocks (same weights, outputs checked), forward and forward+backward.")
    bm.add_argument("--config", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    bm.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    bm.add_argument("--impl", nargs="+", choices=[i for i in IMPLS if i != "dense"], default=list(DEFAULT_IMPLS),
                    help="implementations to time besides the dense baseline, which is always timed")
    bm.add_argument("--tokens", type=_positive_int, default=4096)
    bm.add_argument("--repeats", type=_positive_int, default=5, help="timed runs of each; the median is kept")
    bm.add_argument("--quick", action="store_true", help="512 tokens, 2 repeats, 1 warm-up: a smoke test")
    bm.add_argument("--device", default="auto")
    bm.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "train" and args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_processes(["-m", "minimoe.cli", "--", *map(str, argv)], args.nproc)
    try:
        return {"train": _train, "generate": _generate, "zoo": _zoo, "bench": _bench,
                "eval": _eval, "quantize": _quantize}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input named by the library: one line
        print(f"minimoe {args.command}: error: {e}", file=sys.stderr)
        return 2


def launch_processes(script_args: list[str], nproc: int) -> int:
    """Run `python <script_args>` on `nproc` processes with torchrun (torch.distributed.run) and return its exit
    status. torchrun sets RANK / WORLD_SIZE / MASTER_ADDR for accelerate, and if one process fails it stops the
    others and exits non-zero with that process's error. This is the documented command line, not a home-made
    launcher: `torchrun --standalone --nproc_per_node N -m minimoe.cli train ...` does the same.
    """
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *script_args]
    return subprocess.run(cmd).returncode


def _train(args) -> int:
    from . import data, zoo
    from .train import train
    r = zoo.recipe(args.recipe)
    model_fields = dict(r.model)
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "attention", "n_experts", "top_k",
                 "n_shared_experts", "moe_d_ff", "first_dense_layers", "n_tasks", "capacity_factor",
                 "bias_update_speed", "aux_loss_coef", "router"):
        if getattr(args, name) is not None:
            model_fields[name] = getattr(args, name)
    if args.router is not None and args.router != "deepseek" and args.bias_update_speed is None:
        model_fields.pop("bias_update_speed", None)  # the recipe's DeepSeek setting does not apply to other routers
    train_fields = dict(r.train)
    if args.nproc:
        train_fields.update(processes=args.nproc, zero=args.zero)
    elif args.zero:
        raise ValueError("--zero shards the optimizer across processes: give --nproc N as well")
    for name in ("steps", "batch_size", "seq_len", "batch_tokens", "lr", "warmup_steps", "eval_every",
                 "checkpoint_every", "seed", "schedule", "precision", "min_lr_ratio", "domain_weights",
                 "mixture_temperature"):
        if getattr(args, name) is not None:
            train_fields[name] = getattr(args, name)
    if args.domain_weights is not None or args.mixture_temperature is not None:
        train_fields.pop("mixture_temperature" if args.domain_weights is not None else "domain_weights", None)
    from .config import ModelConfig
    from .train import TrainConfig
    mc = ModelConfig.from_dict(model_fields)
    tc = TrainConfig.from_dict({**train_fields, "device": args.device})
    if args.data and args.corpus:
        raise ValueError("give --data (your files) or --corpus (a built-in corpus), not both")
    splits = None if args.data else data.corpus_splits(args.corpus or r.corpus)
    if args.data:
        docs = data.text_file_corpus(args.data)
        train_docs, val_docs = data.split_documents(docs)
        if not val_docs:
            raise ValueError("need at least two files (or documents) so one can be held out for validation")
        splits = (data.TokenDataset(train_docs), data.TokenDataset(val_docs))
    main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    result = train(mc, tc, data=splits, out_dir=args.out, resume=args.resume,
                   progress=not args.quiet and main_process)
    if not main_process:
        return 0
    if args.nproc:
        print(f"data parallel: {args.nproc} processes{', ZeRO-1' if args.zero else ''}")
    last = result.history["eval"][-1] if result.history["eval"] else None
    if last:
        print(f"step {last['step']}: validation loss {last['val_loss']:.4f}, {last['val_bpb']:.3f} bits/byte")
    seen = result.history["domain_tokens"]
    print("tokens seen per domain: " + ", ".join(f"{d} {n:,} ({n / max(1, sum(seen.values())):.0%})"
                                                 for d, n in seen.items()))
    if "throughput" in result.history:
        t = result.history["throughput"]
        print(f"{t['tokens_per_second']:,.0f} tokens/s, MFU {t['mfu']:.1%} of {t['peak_flops'] / 1e12:.2f} TFLOP/s "
              f"({t['peak_source']})")
    print(f"saved {args.out}")
    return 0


def _load_model(name: str, device):
    """A checkpoint folder or a zoo model (trained first if needed), on `device`."""
    from . import zoo
    from .checkpoint import checkpoint_folder, load_checkpoint
    if checkpoint_folder(name).is_dir():  # also the copy a save killed between its two renames left beside it
        return load_checkpoint(name, device=device)
    if name in zoo.RECIPES:
        return zoo.load(name, device=device).model
    raise FileNotFoundError(f"{name!r} is neither a checkpoint folder nor a zoo model "
                            f"({', '.join(sorted(zoo.RECIPES))})")


def _eval(args) -> int:
    import dataclasses

    from . import evals
    from .device import resolve_device
    if args.k < 2:
        raise ValueError(f"k must be >= 2 (one answer and at least one distractor), got {args.k}")
    model = _load_model(args.model, resolve_device(args.device)).eval()
    axes = args.axes or list(evals.AXES)
    results = {a: evals.evaluate_axis(model, a, n=args.n, seed=args.seed, k=args.k) for a in axes}
    if args.json:
        print(json.dumps({a: dataclasses.asdict(r) for a, r in results.items()}, indent=1, default=str))
        return 0
    print(f"{args.model}: {model.num_parameters():,} parameters, {args.n} items per axis, chance = 1/{args.k}")
    print(f"{'axis':<11}{'score':>7}{'95% CI':>12}  {'metric':<16}{'value':>7}{'95% CI':>15}{'truncated':>11}")
    for a, r in results.items():
        print(f"{a:<11}{r.score:>7.1f}{f'{r.score_ci[0]:.1f}-{r.score_ci[1]:.1f}':>12}  {r.metric:<16}"
              f"{r.value:>7.3f}{f'{r.value_ci[0]:.3f}-{r.value_ci[1]:.3f}':>15}{r.extra.get('truncated', 0):>11}")
    return 0


def _quantize(args) -> int:
    from .data import corpus_splits
    from .device import resolve_device
    from .quant import calibration_data, moe_policy, quantize
    from .quant.bench import compression, lm_metrics
    from .quant.policy import _training_corpus
    model = _load_model(args.model, resolve_device(args.device)).eval()
    group_size = None if args.per_channel else args.group_size
    policy = moe_policy(args.bits, group_size, activation_quant=args.activation_quant, method=args.method) \
        if args.policy == "moe" else None
    corpus = args.corpus or _training_corpus(model)
    calibration = calibration_data(corpus, seq_len=min(256, model.config.max_seq_len)) \
        if args.method == "gptq" else None
    qmodel = quantize(model, args.bits, group_size if args.bits == 4 else None, args.activation_quant, args.method,
                      symmetric=not args.asymmetric, policy=policy, calibration=calibration, progress=True)
    c = compression(qmodel, folder=args.out)
    print(f"saved {args.out}: {c['quantized_weights']:,} weights quantized, {c['bits_per_weight']:.3f} bits per "
          f"weight -> {c['weights_vs_fp16']:.2f}x smaller than fp16 ({c['weights_vs_fp32']:.2f}x than fp32); whole "
          f"file {c['file_bytes']:,} bytes, {c['file_vs_fp16']:.2f}x smaller than the model in fp16")
    if args.eval:
        _, val = corpus_splits(corpus)
        before, after = lm_metrics(model, val), lm_metrics(qmodel, val)
        print(f"held-out {corpus} text ({before['tokens']:,} tokens): {before['bpb']:.4f} -> {after['bpb']:.4f} "
              f"bits per byte ({after['bpb'] / before['bpb'] - 1:+.2%}); next-byte accuracy "
              f"{before['accuracy']:.2%} -> {after['accuracy']:.2%}")
    return 0


def _bench_quant(args) -> int:
    import torch

    from .bench import BENCH_MODEL
    from .config import ModelConfig
    from .device import device_name, resolve_device
    from .quant.bench import goals, goals_text
    from .report import markdown_table
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(**{**BENCH_MODEL.to_dict(), "d_model": args.d_model, "n_layers": args.n_layers,
                         "n_heads": args.n_heads, "n_kv_heads": None, "d_ff": None,  # derived from the new sizes
                         "max_seq_len": max(256, args.prompt_len + args.new_tokens)})
    result = goals(args.device, rounds=args.rounds, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                   config=cfg)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    print(f"decode at batch 1, {cfg.n_layers} layers x {cfg.d_model} wide (random weights), prompt {args.prompt_len} "
          f"+ {args.new_tokens} new tokens, {args.rounds} round-robin rounds, "
          f"{device_name(resolve_device(args.device))}, torch {torch.__version__}")
    print(markdown_table(result["speed"], {"scheme": "scheme", "decode_tokens_per_s": "decode tokens/s:",
                                           "ms_per_step": "ms per step:", "speedup": "vs fp32:",
                                           "speedup_min": "min:", "speedup_max": "max:",
                                           "matches_generate": "tokens = generate"},
                         {"decode_tokens_per_s": ",.0f", "ms_per_step": ".2f", "speedup": ".2f",
                          "speedup_min": ".2f", "speedup_max": ".2f"}))
    print("\nquality (held-out text):")
    print(markdown_table([{"model": name, "scheme": k, **v} for q in result["quality"].values()
                          for name, schemes in q["models"].items() for k, v in schemes.items()],
                         {"model": "model", "scheme": "scheme", "bpb": "bits per byte:",
                          "accuracy": "next-byte accuracy:"}, {"bpb": ".4f", "accuracy": ".2%"}))
    print()
    print(goals_text(result))
    return 0


def _generate(args) -> int:
    from .device import resolve_device
    from .sample import sample_text
    device = resolve_device(args.device)
    model = _load_model(args.model, device)
    print(sample_text(model, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, task=args.task))
    return 0


def _zoo(args) -> int:
    from . import zoo
    if args.zoo_command == "list":
        for row in zoo.available():
            state = ("shipped" if row["cached"] else "no weights") if row["shipped"] else \
                ("cached" if row["cached"] else "not cached")
            print(f"{row['name']:<24} {state:<11} {row['description']}")
    elif args.zoo_command == "train":
        return _zoo_train(args)
    elif args.zoo_command == "verify":
        return _zoo_verify(args)
    else:
        print(zoo.path(args.name))
    return 0


def _zoo_train(args) -> int:
    from . import zoo
    if (args.name is None) == (args.scale is None):
        raise ValueError("give a recipe NAME or --scale book (every shipped recipe), not both or neither")
    progress = not args.quiet
    if args.scale == "book":
        done = zoo.train_book(force=args.force, device=args.device, progress=progress)
        if not done:
            print("no shipped (book-scale) recipes are registered")
        for name, folder in done.items():
            print(f"{name}: {'trained, wrote ' + str(folder) if folder else 'weights present and verified, skipped'}")
    elif zoo.recipe(args.name).shipped:
        print(zoo.train_shipped(args.name, force=args.force, device=args.device, progress=progress))
    else:
        print(zoo.train_recipe(args.name, force=args.force, progress=progress, device=args.device))
    return 0


def _zoo_verify(args) -> int:
    """Exit status 0 when every checked shipped folder verifies, 1 (with the reasons on stderr) otherwise."""
    from . import weights, zoo
    if args.name is not None and not zoo.recipe(args.name).shipped:
        raise ValueError(f"{args.name!r} is not a shipped recipe: it has no committed weights to verify")
    names = [args.name] if args.name else zoo.shipped_recipes()
    failed = 0
    for name in names:
        r, folder = zoo.recipe(name), zoo.path(name)
        try:
            p = weights.verify_shipped(folder, r)
            check = weights.check_against_recipe(folder, r, args.check_steps, args.rel_tol) \
                if args.check_steps else None
        except weights.ShippedWeightsError as e:
            failed += 1
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            continue
        commit = (p["git"] or {}).get("commit", "outside git")[:12]
        print(f"{name}: ok ({sum(f['bytes'] for f in p['files'].values()) / 1e6:.1f} MB {p['dtype']}, key "
              f"{p['recipe_key']}, trained on {p['device']} at commit {commit})")
        if check is not None:
            failed += not check.ok
            print(f"{name}: first {check.steps} losses retrained on the CPU: max difference {check.max_abs_diff:.3g} "
                  f"({check.max_rel_diff:.2%}; tolerance {check.rel_tol:.2%}): {'ok' if check.ok else 'FAILED'}",
                  file=sys.stdout if check.ok else sys.stderr)
    root = weights.weights_dir()
    known = set(zoo.shipped_recipes())
    for stray in sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in known) if root.is_dir() else []:
        print(f"warning: {root / stray} belongs to no shipped recipe", file=sys.stderr)
    total = weights.shipped_bytes(root)
    if total > weights.MAX_TOTAL_BYTES:
        failed += 1
        print(f"FAILED: the shipped weights in {root} take {total / 1e6:.1f} MB, over the "
              f"{weights.MAX_TOTAL_BYTES / 1e6:.0f} MB limit", file=sys.stderr)
    if not names:
        print(f"no shipped (book-scale) recipes are registered; nothing to verify in {root}")
    return 1 if failed else 0


def _bench(args) -> int:
    if args.bench_command == "moe":
        return _bench_moe(args)
    if args.bench_command == "infer":
        return _bench_infer(args)
    if args.bench_command == "quant":
        return _bench_quant(args)
    from .bench import bench_decode, bench_train
    from .config import ModelConfig
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, max_seq_len=256)
    if args.bench_command == "train":
        if args.seq_len > cfg.max_seq_len:
            cfg = ModelConfig(**{**cfg.to_dict(), "max_seq_len": args.seq_len})
        rows = [bench_train(cfg, args.batch_size, args.seq_len, p, steps=args.steps, device=args.device)
                for p in args.precision]
        if len(rows) == 2:
            rows[1]["tokens_per_s_vs_fp32"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        if args.json:
            print(json.dumps({"rows": rows}, indent=1))
            return 0
        print(f"training step, {rows[0]['params'] / 1e6:.1f}M parameters, {rows[0]['tokens_per_step']} tokens/step, "
              f"{rows[0]['device']}")
        print(f"{'precision':<10}{'step ms':>9}{'tokens/s':>10}{'model TFLOP/s':>15}{'peak TFLOP/s':>14}{'MFU':>7}")
        for r in rows:
            print(f"{r['precision']:<10}{r['step_ms']:>9.0f}{r['tokens_per_s']:>10.0f}{r['model_tflops']:>15.3f}"
                  f"{r['peak_tflops']:>14.3f}{r['mfu']:>7.0%}")
        if len(rows) == 2:
            print(f"bf16 / fp32 tokens/s: {rows[1]['tokens_per_s_vs_fp32']:.2f}x")
        return 0
    if args.prompt_len + args.new_tokens > cfg.max_seq_len:
        cfg = ModelConfig(**{**cfg.to_dict(), "max_seq_len": args.prompt_len + args.new_tokens})
    from .device import resolve_device
    from .model import MiniLM
    import torch
    torch.manual_seed(0)
    model = MiniLM(cfg).to(resolve_device(args.device)).eval()
    rows = [bench_decode(model, b, args.prompt_len, args.new_tokens) for b in args.batch_sizes]
    if args.json:
        print(json.dumps({"rows": rows}, indent=1))
        return 0
    print(f"greedy decode, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"{model.num_parameters() / 1e6:.1f}M parameters")
    print(f"{'batch':>5}{'cached tok/s':>14}{'uncached tok/s':>16}{'speed-up':>10}{'same tokens':>13}")
    for r in rows:
        print(f"{r['batch_size']:>5}{r['cached_tokens_per_s']:>14.0f}{r['uncached_tokens_per_s']:>16.0f}"
              f"{r['speedup']:>9.1f}x{str(r['same_tokens']):>13}")
    return 0


def _bench_infer(args) -> int:
    import torch

    from . import bench_infer
    from .bench import BENCH_MODEL
    from .device import resolve_device
    from .model import MiniLM
    device = resolve_device(args.device)
    if args.reference:
        result = bench_infer.reference_goals(device=device, repeats=min(args.repeats, 3))
        print(json.dumps(result["rows"], indent=1) if args.json else bench_infer.goals_table(result))
        return 0
    if args.model:
        model = _load_model(args.model, device).eval()
    else:
        torch.manual_seed(0)
        model = MiniLM(BENCH_MODEL).to(device).eval()
    out = {"rows": [bench_infer.benchmark(model, b, args.prompt_len, args.new_tokens, repeats=args.repeats)
                    for b in args.batch_sizes]}
    if args.article:
        out["article"] = bench_infer.article_benchmark(model)
        out["defects"] = bench_infer.article_defects(model)
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    print(f"{args.model or 'reference model (random weights)'}: {model.num_parameters() / 1e6:.2f}M parameters, "
          f"greedy decoding on {out['rows'][0].get('device', device)}")
    print(bench_infer.rows_table(out["rows"]))
    if args.article:
        a, d = out["article"], out["defects"]
        pc, sr = d["prompt_counting"], d["single_run"]
        print(f"\nthe article's listing as written: prompt {a['input_length']}, max_length {a['max_length']} -> "
              f"{a['generated']} tokens generated, {a['throughput_tokens_per_s']:,.0f} tokens/s printed")
        print(f"counting prompt tokens inflates throughput {pc['inflation']:.2f}x; the listing's number is "
              f"{pc['listing_over_correct'] or float('nan'):.2f}x the correct decode throughput")
        print(f"ten single unsynchronized runs: max/min {sr['max_over_min']:.2f}, worst "
              f"{sr['worst_single_vs_median']:.1%} off the synchronized median")
    return 0


def _bench_moe(args) -> int:
    from .bench_moe import MATCH_TOLERANCE, bench_moe, evaluate_goals
    from .device import device_name, resolve_device
    from .report import markdown_table
    import torch
    tokens, repeats, warmup = (512, 2, 1) if args.quick else (args.tokens, args.repeats, 2)
    rows = bench_moe(configs=args.config, dtypes=args.dtype, tokens=tokens, repeats=repeats, warmup=warmup,
                     device=args.device, impls=["minimoe", *args.impl])
    if args.json:
        print(json.dumps({"rows": rows}, indent=1))
        return 0
    device = resolve_device(args.device)
    print(f"MoE layer vs a dense SwiGLU of the same active FLOPs: {tokens} tokens, median of {repeats} runs, "
          f"{device_name(device)}, torch {torch.__version__}")
    if any(i.startswith("transformers") for i in args.impl):
        print(f"transformers' blocks hold minimoe's weights; their fp32 outputs matched minimoe's (relative error "
              f"<= {MATCH_TOLERANCE:.0e}) before timing")
    print()
    print(markdown_table(rows, {"config": "config", "pass": "pass", "dtype": "dtype", "impl": "impl", "ms": "ms:",
                                "ratio_vs_dense": "vs dense:"}, {"ms": ".1f", "ratio_vs_dense": ".2f"}))
    print()
    for g in evaluate_goals(rows):
        print(f"{'goal' if g['goal_of_issue'] else 'also'}: {g['goal']}: {'met' if g['met'] else 'NOT met'} "
              f"({g['measured']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
