"""Cleaning a corpus before pretraining: quality filters, exact dedup, near-dedup, with a report.

Web-scale pretraining corpora are never used raw. Three cheap stages remove most of the junk:

1. ``quality``     - heuristic rules on a single document: too short to carry context, too long
   (a dump, a data blob), mostly symbols (minified code, tables of numbers, encoding debris),
   or mostly the same line over and over (boilerplate, logs). Rules of this kind are used for
   e.g. Gopher's MassiveText (Rae et al., 2021) and RefinedWeb (Penedo et al., 2023).
2. ``exact_dedup`` - identical texts (after normalising whitespace) keep only their first copy.
   Hashing makes this a single pass with one dictionary lookup per document.
3. ``near_dedup``  - texts that are *almost* identical (a changed date, a tweaked sentence, a fork
   of a file) are found with MinHash + locality-sensitive hashing (Broder, 1997; as in e.g.
   Lee et al., 2022, "Deduplicating Training Data Makes Language Models Better"). Each document
   is a set of word n-grams ("shingles"); MinHash estimates the Jaccard similarity of two sets from
   short signatures, and LSH finds candidate pairs without comparing every pair.

Why bother: duplicated text is memorised instead of generalised from, it silently over-weights
whatever was copied most, and it leaks between train and validation splits. Low-quality text
costs compute and teaches the model little.

Nothing is dropped silently: every stage returns a :class:`StageReport` that counts what it removed
and why, so ``docs_in - sum(removed) == docs_out`` (and the same for bytes) always holds.

Typical use::

    docs = stdlib_corpus()
    kept, report = clean(docs)
    print(report)                     # a readable summary
    report.by_domain()                # {"quality": {"code": 12, "prose": 3}, ...}
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from datasketch import MinHash, MinHashLSH
from tqdm.auto import tqdm

from .data import Document

MAX_EXAMPLES = 5  # removed documents remembered per stage, for the report
LSH_WEIGHTS = (0.1, 0.9)  # (false positive, false negative) weights for choosing the LSH bands


def _n_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _check_int(name: str, value, lo: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _check_fraction(name: str, value, lo_open: bool = False, hi_open: bool = False):
    """value must be a real number in [0, 1]; lo_open/hi_open exclude the end points."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 < value if lo_open else 0.0 <= value) and (value < 1.0 if hi_open else value <= 1.0)
    if not ok:
        lo, hi = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be a number in {lo}0, 1{hi}, got {value!r}")


# -----------------------------------------------------------------------------
# Reports


@dataclass
class StageReport:
    """What one stage removed. ``reasons`` counts removals by reason name; ``examples`` keeps up to
    MAX_EXAMPLES (removed doc_id, why) pairs; the ``*_by_domain`` dicts list every domain that entered
    the stage (0 when nothing of it was removed)."""

    stage: str  # "quality", "exact_dedup", "near_dedup"
    docs_in: int
    docs_removed: int
    bytes_removed: int  # UTF-8 bytes of the removed texts
    reasons: dict[str, int]
    examples: list[tuple[str, str]]
    removed_by_domain: dict[str, int] = field(default_factory=dict)
    bytes_removed_by_domain: dict[str, int] = field(default_factory=dict)

    @property
    def docs_out(self) -> int:
        return self.docs_in - self.docs_removed


def _stage_report(stage: str, docs: list[Document], removed: list[tuple[Document, str, str]]) -> StageReport:
    """docs: the stage's input; removed: (document, reason name, why) for each removed document."""
    reasons: dict[str, int] = {}
    by_domain = {d.domain: 0 for d in docs}
    bytes_by_domain = dict(by_domain)
    for doc, reason, _ in removed:
        reasons[reason] = reasons.get(reason, 0) + 1
        by_domain[doc.domain] += 1
        bytes_by_domain[doc.domain] += _n_bytes(doc.text)
    return StageReport(
        stage=stage, docs_in=len(docs), docs_removed=len(removed), bytes_removed=sum(bytes_by_domain.values()),
        reasons=reasons, examples=[(doc.doc_id, why) for doc, _, why in removed[:MAX_EXAMPLES]],
        removed_by_domain=by_domain, bytes_removed_by_domain=bytes_by_domain,
    )


@dataclass
class CleaningReport:
    """All stages that ran, in order, plus corpus totals before and after."""

    stages: list[StageReport]
    docs_in: int
    docs_out: int
    bytes_in: int
    bytes_out: int

    def by_domain(self, what: str = "docs") -> dict[str, dict[str, int]]:
        """{stage: {domain: documents removed}}; what="bytes" gives UTF-8 bytes removed instead."""
        if what not in ("docs", "bytes"):
            raise ValueError(f"what must be 'docs' or 'bytes', got {what!r}")
        if what == "docs":
            return {s.stage: dict(s.removed_by_domain) for s in self.stages}
        return {s.stage: dict(s.bytes_removed_by_domain) for s in self.stages}

    def rows(self) -> list[dict]:
        """One dict per stage, for tables, e.g.
        ``markdown_table(report.rows(), {"stage": "stage", "docs_in": "docs in:", "docs_removed": "removed:"})``."""
        return [
            {"stage": s.stage, "docs_in": s.docs_in, "docs_removed": s.docs_removed, "docs_out": s.docs_out,
             "bytes_removed": s.bytes_removed,
             "reasons": ", ".join(f"{k}: {v}" for k, v in sorted(s.reasons.items())) or "-"}
            for s in self.stages
        ]

    def __str__(self) -> str:
        lines = [f"cleaning: {self.docs_in:,} -> {self.docs_out:,} documents, "
                 f"{self.bytes_in:,} -> {self.bytes_out:,} bytes"]
        if self.bytes_in:
            lines[0] += f" ({1 - self.bytes_out / self.bytes_in:.1%} of bytes removed)"
        for r in self.rows():
            lines.append(f"  {r['stage']:<12} {r['docs_in']:>8,} in  {-r['docs_removed']:>7,} docs  "
                         f"{-r['bytes_removed']:>12,} bytes  {r['reasons']}")
        for s in self.stages:
            for doc_id, why in s.examples:
                lines.append(f"    e.g. {s.stage}: {doc_id} ({why})")
        return "\n".join(lines)


# -----------------------------------------------------------------------------
# Stage 1: heuristic quality filter


@dataclass(frozen=True)
class QualityFilter:
    """Thresholds of the heuristic quality rules; ``check`` applies them in field order.

    The symbol ratio counts characters that are neither alphanumeric nor whitespace, over all
    characters. The duplicate-line fraction is the share of non-blank lines whose content
    (ignoring surrounding whitespace) already appeared earlier in the same document.
    """

    min_chars: int = 200  # shorter documents are removed
    max_chars: int | None = 200_000  # longer documents are removed; None = no limit
    max_symbol_ratio: float = 0.35
    max_duplicate_line_fraction: float = 0.3

    def __post_init__(self):
        _check_int("min_chars", self.min_chars, 0)
        if self.max_chars is not None:
            _check_int("max_chars", self.max_chars, 1)
            if self.max_chars < self.min_chars:
                raise ValueError(f"max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars})")
        _check_fraction("max_symbol_ratio", self.max_symbol_ratio)
        _check_fraction("max_duplicate_line_fraction", self.max_duplicate_line_fraction)

    def check(self, text: str) -> str | None:
        """None if text passes, else the first failing rule: too_short, too_long, symbols, repeated_lines."""
        if len(text) < self.min_chars:
            return "too_short"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "too_long"
        if symbol_ratio(text) > self.max_symbol_ratio:
            return "symbols"
        if duplicate_line_fraction(text) > self.max_duplicate_line_fraction:
            return "repeated_lines"
        return None


def symbol_ratio(text: str) -> float:
    """Fraction of characters that are neither alphanumeric nor whitespace (0 for empty text)."""
    if not text:
        return 0.0
    n_plain = sum(1 for c in text if c.isalnum() or c.isspace())
    return 1.0 - n_plain / len(text)


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-blank lines that repeat an earlier line (compared stripped); 0 if none."""
    lines = [s for s in (line.strip() for line in text.splitlines()) if s]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def quality_filter(docs, rules: QualityFilter | dict = QualityFilter()) -> tuple[list[Document], StageReport]:
    """Keep documents that pass ``rules.check``; the report counts the others by reason.

    rules may be one QualityFilter for every document or a {domain: QualityFilter} dict (domains it does not
    name get the defaults): source code repeats lines such as ``return`` and ``else:`` by nature, so it needs a
    looser repeated-line rule than prose.
    """
    _check_rules(rules)
    docs = list(docs)
    kept, removed = [], []
    for doc in docs:
        reason = _rule_for(rules, doc.domain).check(doc.text)
        if reason is None:
            kept.append(doc)
        else:
            removed.append((doc, reason, reason))
    return kept, _stage_report("quality", docs, removed)


def _check_rules(rules) -> None:
    if isinstance(rules, QualityFilter) or (
            isinstance(rules, dict) and all(isinstance(r, QualityFilter) for r in rules.values())):
        return
    raise TypeError(f"rules must be a QualityFilter or a {{domain: QualityFilter}} dict, got {rules!r}")


def _rule_for(rules, domain: str) -> QualityFilter:
    return rules if isinstance(rules, QualityFilter) else rules.get(domain, QualityFilter())


# -----------------------------------------------------------------------------
# Stage 2: exact deduplication


def normalize_text(text: str) -> str:
    """Whitespace-insensitive form for exact dedup: strip each line's trailing whitespace (and \\r),
    collapse runs of blank lines into one, strip both ends."""
    out: list[str] = []
    for line in text.split("\n"):
        line = line.rstrip()
        if line or (out and out[-1]):  # a blank line only right after a non-blank one
            out.append(line)
    return "\n".join(out).strip()


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=16).digest()


def exact_dedup(docs) -> tuple[list[Document], StageReport]:
    """Keep the first document of each group with identical normalised text (across domains)."""
    docs = list(docs)
    first: dict[bytes, str] = {}  # text hash -> doc_id of the kept copy
    kept, removed = [], []
    for doc in docs:
        key = _text_key(doc.text)
        if key in first:
            removed.append((doc, "duplicate", f"duplicate of {first[key]}"))
        else:
            first[key] = doc.doc_id
            kept.append(doc)
    return kept, _stage_report("exact_dedup", docs, removed)


# -----------------------------------------------------------------------------
# Stage 3: near-duplicate removal with MinHash + LSH


def shingles(text: str, shingle_size: int = 5) -> set[bytes]:
    """The set of word n-grams of text (n = shingle_size, words = whitespace-separated tokens),
    UTF-8 encoded. A text with fewer than n words is one shingle: all of its words."""
    words = text.split()
    if len(words) < shingle_size:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i:i + shingle_size]).encode("utf-8") for i in range(len(words) - shingle_size + 1)}


def minhash(text: str, num_perm: int = 128, shingle_size: int = 5, seed: int = 1) -> MinHash:
    """MinHash signature of the text's shingle set; same arguments -> same signature, in any process."""
    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(shingles(text, shingle_size)))  # a minimum doesn't depend on the set's order
    return m


def _lsh_index(threshold: float, num_perm: int) -> MinHashLSH:
    """An LSH index tuned for recall: every candidate it returns is checked against the threshold
    anyway, so a false positive costs one cheap comparison while a false negative keeps a duplicate.
    (datasketch's default equal weights miss ~4% of pairs at Jaccard 0.9 for threshold 0.8; these ~0.1%.)"""
    try:
        return MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    except ValueError:
        # For thresholds near 1 datasketch's optimal banding is a single band, which it refuses;
        # two bands only add candidates, and every candidate is checked against the threshold below.
        return MinHashLSH(num_perm=num_perm, params=(2, num_perm // 2))


def near_dedup(docs, threshold: float = 0.8, num_perm: int = 128, shingle_size: int = 5, seed: int = 1,
               progress: bool = False) -> tuple[list[Document], StageReport]:
    """Remove documents whose estimated Jaccard similarity to an earlier *kept* document is >= threshold.

    Documents are visited in order. Each one's MinHash is looked up in an LSH index of the kept
    documents; candidates are confirmed with the MinHash estimate (LSH alone is approximate). A match
    removes the document (the report names the most similar kept one); otherwise it is kept and indexed.
    """
    _check_fraction("threshold", threshold, lo_open=True, hi_open=True)
    _check_int("num_perm", num_perm, 16)
    _check_int("shingle_size", shingle_size, 1)
    _check_int("seed", seed, 0)
    docs = list(docs)
    lsh = _lsh_index(threshold, num_perm)
    kept_sigs: dict[int, MinHash] = {}  # index in docs -> signature, for kept documents
    kept, removed = [], []
    for i, doc in enumerate(tqdm(docs, desc="near_dedup", unit="doc", disable=not progress)):
        sig = minhash(doc.text, num_perm, shingle_size, seed)
        best, best_sim = None, threshold
        for j in sorted(lsh.query(sig)):  # sorted: ties go to the earliest kept document
            sim = sig.jaccard(kept_sigs[j])
            if sim >= best_sim and (best is None or sim > best_sim):
                best, best_sim = j, sim
        if best is None:
            lsh.insert(i, sig, check_duplication=False)
            kept_sigs[i] = sig
            kept.append(doc)
        else:
            removed.append((doc, "duplicate", f"duplicate of {docs[best].doc_id}"))
    return kept, _stage_report("near_dedup", docs, removed)


# -----------------------------------------------------------------------------
# All stages


def clean(docs, rules: QualityFilter | dict | None = QualityFilter(), near_threshold: float | None = 0.8,
          num_perm: int = 128, shingle_size: int = 5, progress: bool = False) -> tuple[list[Document], CleaningReport]:
    """quality -> exact_dedup -> near_dedup, keeping document order.

    rules=None skips the quality stage and near_threshold=None the near-dedup stage; the report lists
    only the stages that ran. Cheap stages go first so the expensive MinHash sees fewer documents.
    """
    if rules is not None:
        _check_rules(rules)
    if near_threshold is not None:  # fail before any work, not after the first stages
        _check_fraction("near_threshold", near_threshold, lo_open=True, hi_open=True)
        _check_int("num_perm", num_perm, 16)
        _check_int("shingle_size", shingle_size, 1)
    docs = list(docs)
    bytes_in = sum(_n_bytes(d.text) for d in docs)
    n_in = len(docs)

    stages = []
    if rules is not None:
        docs, rep = quality_filter(docs, rules)
        stages.append(rep)
    docs, rep = exact_dedup(docs)
    stages.append(rep)
    if near_threshold is not None:
        docs, rep = near_dedup(docs, near_threshold, num_perm, shingle_size, progress=progress)
        stages.append(rep)

    report = CleaningReport(stages=stages, docs_in=n_in, docs_out=len(docs), bytes_in=bytes_in,
                            bytes_out=sum(_n_bytes(d.text) for d in docs))
    return docs, report
