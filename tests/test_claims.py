"""The claims ledger matches OUTLINE.md's inventory, points at real pages, and book/claims.md is fresh."""
import dataclasses
import re
from pathlib import Path

import pytest

from minimoe import claims as ledger

BOOK = Path(__file__).resolve().parents[1] / "book"


def _replace(claims, cid, **changes):
    return tuple(dataclasses.replace(c, **changes) if c.id == cid else c for c in claims)


def test_every_outline_id_exactly_once():
    ids = [c.id for c in ledger.CLAIMS]
    assert len(ledger.OUTLINE_IDS) == 19
    assert sorted(ids) == sorted(ledger.OUTLINE_IDS)
    assert len(set(ids)) == len(ids)


def test_fields_are_well_formed():
    for c in ledger.CLAIMS:
        assert c.chapter == {"A": 1, "T": 2, "P": 3, "S": 4, "D": 5, "F": 6}[c.id[0]], c.id
        assert c.article.strip() and c.why.strip(), c.id
        assert c.verdict in ledger.VERDICTS, c.id


def test_known_defects_are_recorded():
    defects = {c.id: c.defect for c in ledger.CLAIMS if c.defect}
    assert set(defects) >= {"A2", "A3", "T4", "P2", "D2", "D4"}
    assert "1.48" in defects["D2"]


def test_validate_passes_on_the_real_book():
    ledger.validate(BOOK)


def test_validate_rejects_missing_where():
    bad = _replace(ledger.CLAIMS, "A1", where="01-architecture/no-such-notebook.ipynb")
    with pytest.raises(ValueError, match="A1.*does not exist"):
        ledger.validate(BOOK, bad)


def test_validate_rejects_missing_id():
    bad = tuple(c for c in ledger.CLAIMS if c.id != "P2")
    with pytest.raises(ValueError, match="P2 is missing"):
        ledger.validate(BOOK, bad)


def test_validate_rejects_duplicate_id():
    bad = ledger.CLAIMS + (ledger.CLAIMS[0],)
    with pytest.raises(ValueError, match="A1 appears 2 times"):
        ledger.validate(BOOK, bad)


def test_validate_rejects_bad_verdict():
    bad = _replace(ledger.CLAIMS, "D4", verdict="confirmed")
    with pytest.raises(ValueError, match="D4.*verdict"):
        ledger.validate(BOOK, bad)


def test_validate_rejects_verdict_without_where(tmp_path):
    bad = _replace(ledger.CLAIMS, "D2", verdict="contradicted", ours="$1.48/hour implied", where=None)
    with pytest.raises(ValueError, match="D2.*needs a `where`"):
        ledger.validate(tmp_path, bad)


def _fake_book(root, claims=ledger.CLAIMS):
    """Empty stand-ins for every page the ledger links to, so validate() can run outside book/."""
    for c in claims:
        if c.where:
            (root / c.where).parent.mkdir(parents=True, exist_ok=True)
            (root / c.where).write_text("{}")


def test_render_links_and_escapes(tmp_path):
    _fake_book(tmp_path)
    (tmp_path / "01-architecture").mkdir(exist_ok=True)
    (tmp_path / "01-architecture" / "01-dense-baseline.ipynb").write_text("{}")
    rows = _replace(ledger.CLAIMS, "A3", where="01-architecture/01-dense-baseline.ipynb",
                    verdict="contradicted", ours="a | b costs $1")
    ledger.validate(tmp_path, rows)
    text = ledger.render_markdown(rows)
    a3 = next(line for line in text.splitlines() if line.startswith("| A3 "))
    assert "[01-dense-baseline](01-architecture/01-dense-baseline.ipynb)" in a3
    assert r"a \| b costs \$1" in a3
    assert len(re.split(r"(?<!\\)\|", a3)) == 7  # five cells; the escaped `|` splits nothing


def test_committed_page_is_fresh():
    page = BOOK / "claims.md"
    assert page.read_text(encoding="utf-8") == ledger.render_markdown(), (
        "book/claims.md is stale: run `python -m minimoe.claims --write book/claims.md`"
    )


def test_check_cli_flags_a_stale_page(tmp_path, capsys):
    page = tmp_path / "claims.md"
    _fake_book(tmp_path)
    assert ledger.main(["--write", str(page)]) == 0
    assert ledger.main(["--check", str(page)]) == 0
    page.write_text(page.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    assert ledger.main(["--check", str(page)]) == 1
    assert "stale" in capsys.readouterr().err


def test_every_claim_has_a_verdict():
    """The ledger is complete: no row may still say "not yet measured", and each has its notebook and reason."""
    open_rows = [c.id for c in ledger.CLAIMS if c.verdict == ledger.NOT_YET]
    assert not open_rows, f"claims still {ledger.NOT_YET!r}: {open_rows}"
    assert all(c.where and c.ours and c.why for c in ledger.CLAIMS)
