"""Train the book-scale models whose weights the repository ships: `python scripts/train_book_models.py`.

Every recipe registered with shipped=True in minimoe/zoo.py is trained from scratch (on a GPU if there is one)
and written, in bf16 with its provenance, to weights/<name>/, ready to commit. Weights already there are
verified and kept; --force trains and replaces them. The same as `minimoe zoo train --scale book`, so that
the recipes live in one place; its options (--force, --device, --quiet) are accepted here too.
"""
import sys

from minimoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["zoo", "train", "--scale", "book", *sys.argv[1:]]))
