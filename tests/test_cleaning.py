import random

import pytest

from minimoe.cleaning import (
    CleaningReport, QualityFilter, StageReport, clean, exact_dedup, near_dedup, normalize_text, quality_filter,
)
from minimoe.data import Document, stdlib_corpus

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ri", "su", "ta", "vo", "ze")
         for b in ("ban", "cel", "dor", "fin", "gat", "hum", "jix", "kor", "lep", "mun")]  # 100 words


def words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(VOCAB) for _ in range(n)]


def prose(ws: list[str], per_line: int = 12) -> str:
    """Words -> lines of per_line words, ending with a full stop: passes the default quality rules."""
    return "\n".join(" ".join(ws[i:i + per_line]) + "." for i in range(0, len(ws), per_line))


def doc(doc_id: str, text: str, domain: str = "prose") -> Document:
    return Document(doc_id, domain, text, doc_id)


def nbytes(docs) -> int:
    return sum(len(d.text.encode("utf-8")) for d in docs)


def assert_accounts(docs_in, kept, report):
    """Every input document is either kept or counted as removed by exactly one stage, in order."""
    docs_in = list(docs_in)
    assert report.docs_in == len(docs_in) and report.docs_out == len(kept)
    assert report.bytes_in == nbytes(docs_in) and report.bytes_out == nbytes(kept)
    assert report.docs_in - sum(s.docs_removed for s in report.stages) == report.docs_out
    assert report.bytes_in - sum(s.bytes_removed for s in report.stages) == report.bytes_out
    n = report.docs_in
    for s in report.stages:  # each stage sees what the previous one left
        assert s.docs_in == n and sum(s.reasons.values()) == s.docs_removed
        assert sum(s.removed_by_domain.values()) == s.docs_removed
        assert sum(s.bytes_removed_by_domain.values()) == s.bytes_removed
        n -= s.docs_removed
    pos = {d.doc_id: i for i, d in enumerate(docs_in)}
    assert [pos[d.doc_id] for d in kept] == sorted(pos[d.doc_id] for d in kept)  # order preserved


# -----------------------------------------------------------------------------
# exact dedup


def test_exact_dedup_keeps_first_and_ignores_trailing_whitespace():
    a = prose(words(30, 0)) + "\n\n" + prose(words(30, 1))  # two paragraphs
    b = prose(words(60, 2))
    docs = [doc("a", a), doc("b", b), doc("a2", a),
            doc("a3", "\n \n" + a.replace("\n", "  \t\r\n").replace("\r\n  \t\r\n", "\n\n \n\n") + "   \n"),
            doc("a4", a.replace("\n\n", "\n"))]  # a paragraph break is content: kept
    assert docs[2].text != docs[3].text and "\n\n \n\n" in docs[3].text
    kept, rep = exact_dedup(docs)
    assert [d.doc_id for d in kept] == ["a", "b", "a4"]
    assert rep.stage == "exact_dedup" and rep.docs_in == 5 and rep.docs_removed == 2
    assert rep.reasons == {"duplicate": 2}
    assert rep.bytes_removed == nbytes(docs[2:4])
    assert rep.examples == [("a2", "duplicate of a"), ("a3", "duplicate of a")]


def test_normalize_text():
    assert normalize_text("  x  \r\n\n\n\n  y\t\n\n") == "x\n\n  y"  # inner indentation kept
    assert normalize_text("") == ""


def test_dedup_is_across_domains():
    text = prose(words(60, 2))
    docs = [doc("code:a", text, "code"), doc("prose:a", text, "prose")]
    kept, rep = clean(docs)
    assert [d.doc_id for d in kept] == ["code:a"]
    assert CleaningReport.by_domain(rep) == {"quality": {"code": 0, "prose": 0},
                                             "exact_dedup": {"code": 0, "prose": 1},
                                             "near_dedup": {"code": 0}}
    assert rep.by_domain("bytes")["exact_dedup"]["prose"] == len(text)


# -----------------------------------------------------------------------------
# near dedup


def test_near_duplicate_removed_unrelated_and_half_changed_kept():
    base = words(340, 3)  # ~2 KB
    edited = list(base)
    for i in (40, 150, 290):  # a few words changed
        edited[i] = "CHANGED"
    half = base[:170] + words(170, 4)
    docs = [doc("base", prose(base)), doc("unrelated", prose(words(340, 5))),
            doc("edited", prose(edited)), doc("half", prose(half))]
    assert 1900 < len(docs[0].text) < 2300
    kept, rep = near_dedup(docs, threshold=0.8)
    assert [d.doc_id for d in kept] == ["base", "unrelated", "half"]
    assert rep.stage == "near_dedup" and rep.docs_removed == 1 and rep.reasons == {"duplicate": 1}
    assert rep.examples == [("edited", "duplicate of base")]
    assert rep.bytes_removed == nbytes(docs[2:3])


def test_near_dedup_short_docs_and_high_threshold():
    # Fewer words than shingle_size: the whole token tuple is the one shingle.
    docs = [doc("a", "hello  world"), doc("b", "hello world\n"), doc("c", "world hello")]
    kept, _ = near_dedup(docs)
    assert [d.doc_id for d in kept] == ["a", "c"]
    # datasketch's optimal banding for 0.99 / 16 permutations is one band, which it rejects: still works.
    text = prose(words(100, 6))
    kept, rep = near_dedup([doc("x", text), doc("y", text), doc("z", prose(words(100, 7)))], 0.99, num_perm=16)
    assert [d.doc_id for d in kept] == ["x", "z"] and rep.examples == [("y", "duplicate of x")]


# -----------------------------------------------------------------------------
# quality filter


NORMAL = ("Mixture-of-Experts layers route each token to a few of many feed-forward networks. "
          "A small router scores the experts, the top ones process the token, and their outputs are "
          "mixed by the router's weights. This keeps the compute per token low while the number of "
          "parameters grows with the number of experts.")


@pytest.mark.parametrize("text, reason", [
    ("Too short to be useful.", "too_short"),
    (NORMAL + " " + NORMAL * 700, "too_long"),
    ("x = {'a': [1, 2]}; y = (x[0] + x[1]) * 2 ** -3;\n" * 10 + "#@!$%^&*()[]{}<>|\\/~`;:'\"" * 20, "symbols"),
    ("== the same boilerplate line ==\n\n" * 20 + NORMAL, "repeated_lines"),
    (NORMAL, None),
])
def test_quality_reasons(text, reason):
    assert QualityFilter().check(text) == reason


def test_quality_filter_report_and_custom_rules():
    docs = [doc("ok", NORMAL), doc("short", "hi"), doc("ok2", NORMAL + " More."),
            doc("sym", "!@#$%^&*" * 40), doc("rep", "same line\n" * 40)]
    kept, rep = quality_filter(docs)
    assert [d.doc_id for d in kept] == ["ok", "ok2"]
    assert rep.stage == "quality" and rep.docs_in == 5 and rep.docs_removed == 3
    assert rep.reasons == {"too_short": 1, "symbols": 1, "repeated_lines": 1}
    assert rep.examples == [("short", "too_short"), ("sym", "symbols"), ("rep", "repeated_lines")]
    assert rep.bytes_removed == nbytes(docs[1:2] + docs[3:5])
    loose = QualityFilter(min_chars=0, max_chars=None, max_symbol_ratio=1.0, max_duplicate_line_fraction=1.0)
    assert quality_filter(docs, loose)[1].docs_removed == 0


@pytest.mark.parametrize("kwargs, name", [
    ({"min_chars": -1}, "min_chars"),
    ({"min_chars": 1.5}, "min_chars"),
    ({"max_chars": 0}, "max_chars"),
    ({"min_chars": 500, "max_chars": 100}, "max_chars"),
    ({"max_symbol_ratio": 1.5}, "max_symbol_ratio"),
    ({"max_duplicate_line_fraction": -0.1}, "max_duplicate_line_fraction"),
])
def test_quality_filter_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        QualityFilter(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.0}, "threshold"),
    ({"threshold": "0.8"}, "threshold"),
    ({"num_perm": 8}, "num_perm"),
    ({"shingle_size": 0}, "shingle_size"),
    ({"seed": -1}, "seed"),
])
def test_near_dedup_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        near_dedup([doc("a", NORMAL)], **kwargs)


def test_clean_validation():
    with pytest.raises(ValueError, match="near_threshold"):
        clean([doc("a", NORMAL)], near_threshold=1.5)
    with pytest.raises(TypeError, match="rules"):
        clean([doc("a", NORMAL)], rules={"min_chars": 10})


# -----------------------------------------------------------------------------
# the whole pipeline


def mixed_docs() -> list[Document]:
    a, b, c = prose(words(300, 10)), prose(words(300, 11)), prose(words(300, 12))
    near_a = a.replace(a.split()[100], "CHANGED", 1)
    return [
        doc("code:a", a, "code"), doc("prose:short", "tiny", "prose"), doc("prose:b", b, "prose"),
        doc("code:a-copy", a + "\n\n", "code"), doc("prose:a-copy", a, "prose"),
        doc("code:sym", "}{" * 300, "code"), doc("prose:near-a", near_a, "prose"),
        doc("code:c", c, "code"), doc("prose:rep", "again\n" * 100, "prose"), doc("code:b-copy", b, "code"),
    ]


def test_clean_invariants_and_order():
    docs = mixed_docs()
    kept, rep = clean(iter(docs))  # any iterable
    assert [d.doc_id for d in kept] == ["code:a", "prose:b", "code:c"]
    assert [s.stage for s in rep.stages] == ["quality", "exact_dedup", "near_dedup"]
    assert [s.docs_removed for s in rep.stages] == [3, 3, 1]
    assert rep.stages[0].reasons == {"too_short": 1, "symbols": 1, "repeated_lines": 1}
    assert rep.stages[2].examples == [("prose:near-a", "duplicate of code:a")]
    assert rep.by_domain() == {"quality": {"code": 1, "prose": 2},
                               "exact_dedup": {"code": 2, "prose": 1},
                               "near_dedup": {"code": 0, "prose": 1}}
    assert_accounts(docs, kept, rep)
    rows = rep.rows()
    assert [r["stage"] for r in rows] == ["quality", "exact_dedup", "near_dedup"]
    assert rows[0]["docs_removed"] == 3 and rows[1]["reasons"] == "duplicate: 3"
    text = str(rep)
    assert "10 -> 3 documents" in text and "near_dedup" in text and "prose:near-a" in text


def test_clean_is_deterministic():
    kept1, rep1 = clean(mixed_docs())
    kept2, rep2 = clean(mixed_docs())
    assert kept1 == kept2 and rep1 == rep2


def test_clean_skips_stages_and_handles_empty_input():
    docs = mixed_docs()
    kept, rep = clean(docs, rules=None, near_threshold=None)
    assert [s.stage for s in rep.stages] == ["exact_dedup"] and len(kept) == 7
    assert_accounts(docs, kept, rep)
    kept, rep = clean([])
    assert kept == [] and (rep.docs_in, rep.docs_out, rep.bytes_in, rep.bytes_out) == (0, 0, 0, 0)
    assert all(s == StageReport(s.stage, 0, 0, 0, {}, []) for s in rep.stages) and len(rep.stages) == 3
    assert "0 -> 0 documents" in str(rep)


def test_clean_stdlib_smoke():
    docs = stdlib_corpus(max_files=60)
    kept, rep = clean(docs)
    assert 0 < len(kept) <= len(docs)
    assert_accounts(docs, kept, rep)
    assert set(rep.by_domain()["quality"]) == {"code", "prose"}


def test_rules_per_domain():
    code = "\n".join(["if x:", "    return 1", "else:", "    return 2"] * 30)   # code repeats lines by nature
    docs = [Document("code:a", "code", code, "a"), Document("prose:b", "prose", code, "b")]
    loose = {"code": QualityFilter(max_duplicate_line_fraction=1.0)}
    kept, rep = quality_filter(docs, loose)
    assert [d.doc_id for d in kept] == ["code:a"]                     # prose falls back to the defaults
    assert rep.reasons == {"repeated_lines": 1}
    kept, _ = quality_filter(docs)
    assert kept == []
    with pytest.raises(TypeError, match="rules"):
        quality_filter(docs, {"code": 0.5})
