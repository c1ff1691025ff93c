"""Train the book-scale models whose weights the repository ships: `python scripts/train_book_models.py`.

Every recipe registered with shipped=True in minimoe/zoo.py is trained from scratch (on a GPU if there is one)
and written, in bf16 with its provenance, to weights/<name>/, ready to commit. Weights already there are
verified and kept; --force trains and replaces them. Without --jobs this is `minimoe zoo train --scale book`
(the recipes live in one place); its options (--force, --device, --quiet) are accepted here too.

--jobs N (CPU): N recipes at a time, each in its own process with (CPU cores / N) threads. Small models use two
cores poorly (one 96-wide model: 10,200 tokens/s on one core, about 11,500 on two), so on a 2-core machine
`--jobs 2` trains the family in about 60% of the time. Each run's provenance records its own wall time.
"""
import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from minimoe import weights, zoo
from minimoe.checkpoint import checkpoint_folder
from minimoe.cli import main


def _todo(force: bool) -> list[str]:
    names = []
    for name in zoo.shipped_recipes():
        if force or not checkpoint_folder(zoo.path(name)).exists():
            names.append(name)
        else:
            weights.verify_shipped(zoo.path(name), zoo.recipe(name))  # raises, naming the file and the fix
    return names


def _train_one(name: str, args, threads: int) -> tuple[str, int]:
    cmd = [sys.executable, "-m", "minimoe.cli", "zoo", "train", name, "--device", args.device, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return name, subprocess.run(cmd + (["--force"] if args.force else []), env=env).returncode


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=1, help="recipes trained at once, each in its own process")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs == 1:
        sys.exit(main(["zoo", "train", "--scale", "book", "--device", args.device]
                      + ["--force"] * args.force + ["--quiet"] * args.quiet))
    todo = _todo(args.force)
    # seed 0 of every family first, so a partial run already has one model of each
    todo.sort(key=lambda n: (zoo.recipe(n).train["seed"], n))
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [name for name, rc in pool.map(lambda n: _train_one(n, args, threads), todo) if rc]
    for name in todo:
        print(f"{name}: {'FAILED' if name in failed else 'trained, wrote ' + str(zoo.path(name))}")
    sys.exit(1 if failed else 0)
