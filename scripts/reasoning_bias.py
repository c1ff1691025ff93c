"""Which wrong candidate does a model prefer on the reasoning axis, and why?

    python scripts/reasoning_bias.py mix-uniform moe-mixed      # zoo recipe bases (each seed is loaded)

For every seed of each recipe base: accuracy on the expression and comparison items, how often each kind of
candidate is chosen when it is offered (the answer, a near miss, an operand of the last step copied from the
prompt, ...), and the rank of the chosen value among the candidates' values beside the answer's rank. A model
below chance shows here which systematic preference put it there (issue 20).
"""
import argparse
import collections

from minimoe import zoo
from minimoe.evals import suite


def kind(item, cand: str) -> str:
    """What a candidate of a reasoning item is, relative to its prompt and answer."""
    c, answer = cand.strip(), item.answer.strip()
    if c == answer:
        return "answer"
    if item.source.startswith("arithmetic:cmp:"):
        return "a name of the chain" if c in item.prompt else "a name not in the prompt"
    a, _, b = item.prompt[:-2].rsplit(" ", 3)[-3:]
    if c in (a, b):
        return "an operand of the last step (in the prompt)"
    if c in item.prompt:
        return "another number of the prompt"
    d = int(c) - int(answer)
    return f"near miss {d:+d}" if abs(d) <= 20 else "the last step with another operator"


def value_rank(item, index: int) -> int:
    values = [int(c) for c in item.candidates]
    return sorted(values).index(values[index])


def report(name: str, items) -> None:
    model = zoo.load(name).model.eval()
    scored = suite.score_items(model, items)
    chosen, offered = collections.Counter(), collections.Counter()
    by_type = collections.defaultdict(list)
    ranks, answer_ranks = collections.Counter(), collections.Counter()
    for it, choice, ok in zip(items, scored["choices"], scored["correct"]):
        by_type[it.source.split(":")[1]].append(ok)
        offered.update(kind(it, c) for c in it.candidates)
        chosen[kind(it, it.candidates[choice])] += 1
        if it.source.startswith("arithmetic:expr:"):
            ranks[value_rank(it, choice)] += 1
            answer_ranks[value_rank(it, it.correct_index)] += 1
    acc = ", ".join(f"{t} {sum(v) / len(v):.3f} (n={len(v)})" for t, v in sorted(by_type.items()))
    print(f"{name}: accuracy {scored['accuracy']:.3f}; {acc}")
    for k, v in chosen.most_common():
        print(f"    {k:46s} chosen {v:4d} of {offered[k]:4d} offered ({v / offered[k]:.2f})")
    print(f"    expressions, rank of the chosen value (0 = smallest): {dict(sorted(ranks.items()))}; "
          f"of the answer: {dict(sorted(answer_ranks.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bases", nargs="+", help="zoo recipe bases, e.g. mix-uniform")
    parser.add_argument("-n", type=int, default=200, help="reasoning items (default 200, as chapter 3)")
    args = parser.parse_args()
    items = suite.axis_items("reasoning", args.n, seed=0)
    for base in args.bases:
        for name in zoo.seed_names(base):
            report(name, items)


if __name__ == "__main__":
    main()
