import math
import os

import numpy as np
import pytest
import torch

from minimoe import data
from minimoe.data import (
    SPECIAL_TOKENS, ByteTokenizer, Document, TokenDataset, builtin_splits, corpus_splits,
    mixed_documents, mixed_splits, split_documents, stdlib_corpus, text_file_corpus,
)


@pytest.fixture(scope="module")
def full_corpus():
    # The whole built-in corpus takes a few seconds to parse: build it once per module.
    return stdlib_corpus()


# -----------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("text", ["hello, world\n", "混合专家", "emoji 🤖🧪 ok", "", "tab\tnul\x00"])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert tok.decode(np.array(ids)) == text
    assert tok.decode(tuple(ids)) == text
    arr = tok.encode_array(text)
    assert arr.dtype == np.uint16 and arr.tolist() == ids


def test_tokenizer_specials_and_counts():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 == 256 + len(SPECIAL_TOKENS)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.sep_id) == (256, 257, 258, 259)
    ids = tok.encode("混合专家", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert len(ids) == 12 + 2  # 4 CJK chars x 3 UTF-8 bytes, plus bos/eos
    mixed = [tok.bos_id, *tok.encode("ab"), tok.sep_id, *tok.encode("c"), tok.pad_id, tok.eos_id]
    assert tok.decode(mixed) == "abc"
    assert tok.count_bytes(mixed) == 3
    assert tok.count_bytes(torch.tensor(mixed)) == 3
    # A sample cut mid-character must not crash decode.
    assert tok.decode(tok.encode("混")[:2]) == "\ufffd"
    with pytest.raises(ValueError):
        tok.decode([300])


# -----------------------------------------------------------------------------
# corpora


def test_stdlib_corpus_small_is_deterministic():
    docs = stdlib_corpus(max_files=40)
    assert {d.domain for d in docs} == {"code", "prose"}
    assert sum(d.domain == "code" for d in docs) == 40
    assert len({d.doc_id for d in docs}) == len(docs)
    assert any(d.source.startswith("topic:") for d in docs)
    assert stdlib_corpus(max_files=40) == docs
    code_sources = [d.source for d in docs if d.domain == "code"]
    assert code_sources == sorted(code_sources)


def test_stdlib_corpus_skip_rules(tmp_path):
    # A fake stdlib exercising every skip rule.
    long_doc = '"""' + "Module docs. " * 30 + '"""\n'
    (tmp_path / "good.py").write_text(long_doc + "def f():\n    'Say hi.'\n    return 1\n")
    (tmp_path / "short_doc.py").write_text('"""tiny"""\nx = 1\n')
    (tmp_path / "broken.py").write_text(long_doc + "def (:\n")
    (tmp_path / "latin1.py").write_bytes(b"# caf\xe9\n")
    (tmp_path / "huge.py").write_text("x = 1\n" * 100_000)
    (tmp_path / "notes.txt").write_text("not python")
    for skipped in ("test", "tests", "idle_test", "site-packages", "__pycache__"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "m.py").write_text(long_doc)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(long_doc)

    docs = stdlib_corpus(str(tmp_path))
    files = [d for d in docs if not d.source.startswith("topic:")]
    code = {d.source for d in files if d.domain == "code"}
    prose = {d.source: d for d in files if d.domain == "prose"}
    assert code == {"good.py", "short_doc.py", "broken.py", "pkg/mod.py"}
    assert set(prose) == {"good.py", "pkg/mod.py"}  # broken: unparsable; short_doc: < 200 chars
    assert prose["good.py"].text.endswith("\n\nSay hi.")
    assert prose["good.py"].doc_id == "prose:good.py"
    assert stdlib_corpus(str(tmp_path), max_files=1)[0].source == "broken.py"


def test_text_file_corpus(tmp_path):
    d = tmp_path / "mydata"
    (d / "nested").mkdir(parents=True)
    (d / "a.txt").write_text("first file")
    (d / "nested" / "b.md").write_text("# second")
    (d / "blob.bin").write_bytes(b"\x00\x01binary")
    (d / "empty.txt").write_text("  \n")
    docs = text_file_corpus(d, domain="mine")
    assert [os.path.basename(x.source) for x in docs] == ["a.txt", "b.md"]
    assert [x.text for x in docs] == ["first file", "# second"]
    assert {x.domain for x in docs} == {"mine"}
    assert len({x.doc_id for x in docs}) == 2
    # A file named explicitly is read even without a listed suffix; duplicates are dropped.
    single = tmp_path / "notes.log"
    single.write_text("log line")
    docs2 = text_file_corpus([str(single), d, d / "a.txt"])
    assert [x.text for x in docs2] == ["log line", "first file", "# second"]

    with pytest.raises(FileNotFoundError, match="nope"):
        text_file_corpus([d, tmp_path / "nope"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no usable text"):
        text_file_corpus(tmp_path / "empty_dir")


# -----------------------------------------------------------------------------
# splitting


def test_split_by_source_on_full_corpus(full_corpus):
    train, val = split_documents(full_corpus, val_fraction=0.05, seed=0)
    assert len(train) + len(val) == len(full_corpus)
    train_src, val_src = {d.source for d in train}, {d.source for d in val}
    assert train_src and val_src and not (train_src & val_src)
    side = {d.doc_id: "train" for d in train} | {d.doc_id: "val" for d in val}
    twins = 0
    for d in full_corpus:
        if d.domain == "code" and f"prose:{d.source}" in side:
            assert side[f"prose:{d.source}"] == side[d.doc_id]
            twins += 1
    assert twins > 300
    # Roughly the requested fraction of sources goes to validation.
    n_src = len(train_src | val_src)
    assert 0.02 < len(val_src) / n_src < 0.09

    assert split_documents(full_corpus, 0.05, 0) == (train, val)
    assert split_documents(list(reversed(full_corpus)), 0.05, 0)[1] == list(reversed(val))
    assert {d.source for d in split_documents(full_corpus, 0.05, seed=1)[1]} != val_src


def test_split_edge_cases():
    docs = [Document(f"t:{i}", "t", "x" * 10, f"s{i}") for i in range(3)]
    for frac in (1e-9, 1 - 1e-9):
        train, val = split_documents(docs, frac)
        assert train and val  # both sides non-empty even when the hash says otherwise
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="val_fraction"):
            split_documents(docs, bad)


# -----------------------------------------------------------------------------
# TokenDataset


def _two_domain_dataset():
    rng = np.random.default_rng(123)
    code = "".join(rng.choice(list("abc"), size=3000))
    prose = "".join(rng.choice(list("xyz"), size=2000))
    return TokenDataset([Document("c", "code", code, "c"), Document("p", "prose", prose, "p")]), code, prose


def test_token_dataset_streams():
    tok = ByteTokenizer()
    ds = TokenDataset([Document("a", "d", "ab", "a"), Document("b", "d", "cd", "b"),
                       Document("z", "a", "q", "z")])
    assert ds.domains == ["a", "d"]
    assert ds.streams["d"].dtype == np.uint16
    assert ds.streams["d"].tolist() == [97, 98, tok.eos_id, 99, 100, tok.eos_id]
    assert ds.n_tokens("d") == 6 and ds.n_tokens() == 8
    with pytest.raises(ValueError, match="nope"):
        ds.n_tokens("nope")
    with pytest.raises(ValueError):
        TokenDataset([])


def test_sample_batch_shapes_and_windows():
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=4000))
    ds = TokenDataset([Document("one", "only", text, "one")])
    x, y = ds.sample_batch(16, 32, np.random.default_rng(1))
    assert x.shape == y.shape == (16, 32)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    tok = ByteTokenizer()
    for row_x, row_y in zip(x, y):
        window = torch.cat([row_x, row_y[-1:]])
        assert tok.decode(window) in text  # a real substring of the stream
    # Starts are uniform over the whole stream, not stuck at the beginning.
    xs, _ = ds.sample_batch(256, 32, np.random.default_rng(2))
    starts = [text.find(tok.decode(r)) for r in xs]
    assert min(starts) < 500 and max(starts) > 3400


def test_sample_batch_weights_and_determinism():
    ds, code, prose = _two_domain_dataset()
    tok = ByteTokenizer()
    x, y = ds.sample_batch(64, 16, np.random.default_rng(0), weights={"code": 1, "prose": 0})
    assert set("".join(tok.decode(r) for r in x)) <= set("abc")
    x, _ = ds.sample_batch(64, 16, np.random.default_rng(0), weights={"prose": 2.5})
    assert set("".join(tok.decode(r) for r in x)) <= set("xyz")
    # Default: both domains show up.
    x, _ = ds.sample_batch(64, 16, np.random.default_rng(0))
    chars = set("".join(tok.decode(r) for r in x))
    assert chars & set("abc") and chars & set("xyz")

    a = ds.sample_batch(8, 16, np.random.default_rng(7))
    b = ds.sample_batch(8, 16, np.random.default_rng(7))
    c = ds.sample_batch(8, 16, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])

    r = np.random.default_rng(0)
    with pytest.raises(ValueError, match="'poetry'"):
        ds.sample_batch(4, 8, r, weights={"poetry": 1.0})
    with pytest.raises(ValueError, match="'code'"):
        ds.sample_batch(4, 8, r, weights={"code": -1.0, "prose": 2.0})
    with pytest.raises(ValueError, match="zero"):
        ds.sample_batch(4, 8, r, weights={"code": 0, "prose": 0})


def test_too_short_domain_raises():
    ds = TokenDataset([Document("a", "big", "x" * 100, "a"), Document("b", "tiny", "abc", "b")])
    with pytest.raises(ValueError, match=r"'tiny' has only 4 tokens"):
        ds.sample_batch(2, 8, np.random.default_rng(0))
    ds.sample_batch(2, 8, np.random.default_rng(0), weights={"big": 1})  # zero weight: not needed
    with pytest.raises(ValueError, match="'tiny'"):
        ds.eval_batches(2, 8)
    with pytest.raises(ValueError, match="'nope'"):
        ds.eval_batches(2, 8, domain="nope")


def test_eval_batches():
    # Each line is exactly 8 bytes, so window k (seq_len 8) is line k: easy to identify.
    n_lines = 1000
    text = "".join(f"{i:07d}\n" for i in range(n_lines))
    ds = TokenDataset([Document("n", "num", text, "n"), Document("o", "abc", "abc" * 50, "o")])
    tok = ByteTokenizer()

    batches = list(ds.eval_batches(32, 8, domain="num"))
    assert batches and all(x.shape[1] == 8 and x.shape == y.shape for x, y in batches)
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    # Full pass: windows tile the stream exactly, so every token is a target once.
    xs = torch.cat([x for x, _ in batches]).reshape(-1)
    stream = torch.from_numpy(ds.streams["num"].astype(np.int64))
    n_win = (len(stream) - 1) // 8
    assert torch.equal(xs, stream[: n_win * 8])
    assert len(batches) == math.ceil(n_win / 32)

    # Deterministic, and domains come in sorted order.
    again = list(ds.eval_batches(32, 8, domain="num"))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    all_dom = [tok.decode(x.reshape(-1)) for x, _ in ds.eval_batches(4, 8)]
    n_abc = math.ceil(((150 + 1) - 1) // 8 / 4)  # "abc"*50 + eos -> 18 windows -> 5 batches
    assert all(set(t) <= set("abc") for t in all_dom[:n_abc])
    assert all(set(t) <= set("0123456789\n") for t in all_dom[n_abc:])
    assert len(all_dom) == n_abc + math.ceil(n_win / 4)

    # max_batches caps the count and spreads distinct windows over the whole stream.
    capped = list(ds.eval_batches(10, 8, max_batches=3, domain="num"))
    assert len(capped) == 3
    lines = [int(tok.decode(r)) for x, _ in capped for r in x]
    assert len(lines) == 30 and lines == sorted(set(lines))
    assert lines[0] == 0 and lines[-1] > 900
    assert len(list(ds.eval_batches(10, 8, max_batches=3))) == 3


# -----------------------------------------------------------------------------
# built-in splits


def test_builtin_splits(full_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path))
    # Reuse the fixture instead of parsing the stdlib a second time (saves ~5 s).
    calls = []

    def fake_corpus(stdlib_dir=None, max_files=None):
        calls.append(max_files)
        return list(full_corpus)

    monkeypatch.setattr(data, "stdlib_corpus", fake_corpus)
    builtin_splits.cache_clear()
    try:
        train, val = builtin_splits()
        assert builtin_splits() is builtin_splits()  # in-process cache
        sizes = {f"{s}/{d}": ds.n_tokens(d) for s, ds in (("train", train), ("val", val)) for d in ds.domains}
        print("builtin_splits tokens:", sizes)
        assert train.domains == val.domains == ["code", "prose"]
        assert train.n_tokens("code") > 1_000_000 and train.n_tokens("prose") > 100_000
        assert val.n_tokens("code") > 10_000 and val.n_tokens("prose") > 10_000

        # Same streams as building by hand from the corpus.
        tr_docs, va_docs = split_documents(full_corpus, 0.05, 0)
        manual = TokenDataset(tr_docs)
        assert all(np.array_equal(manual.streams[d], train.streams[d]) for d in manual.domains)

        # Disk cache round trip gives identical arrays.
        assert len(list((tmp_path / "data").glob("*.npz"))) == 1
        builtin_splits.cache_clear()
        train2, val2 = builtin_splits()
        assert train2 is not train
        assert calls == [None]  # the second build came from disk, not from the corpus
        for a, b in ((train, train2), (val, val2)):
            assert a.domains == b.domains and a.n_docs == b.n_docs
            assert all(np.array_equal(a.streams[d], b.streams[d]) for d in a.domains)
        x, y = train2.sample_batch(4, 64, np.random.default_rng(0))
        assert x.shape == (4, 64)
        with pytest.raises(ValueError):
            builtin_splits(val_fraction=0.0)
    finally:
        builtin_splits.cache_clear()  # don't leak datasets from the temp cache into other tests


def test_corpus_splits_names(monkeypatch):
    with pytest.raises(ValueError, match="unknown corpus 'web'.*stdlib"):
        corpus_splits("web")


def test_mixed_splits_small(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path))
    train, val = mixed_splits(max_files=12, n_generated=300)
    assert train.domains == ["arithmetic", "code", "dialogue", "facts", "prose"]
    assert set(val.domains) <= set(train.domains) and len(val.domains) >= 3
    again = mixed_splits.__wrapped__(max_files=12, n_generated=300)       # from the disk cache
    assert all(np.array_equal(again[0].streams[d], train.streams[d]) for d in train.domains)
    docs, report = mixed_documents(n_generated=300, max_files=12)
    assert report.docs_in == len(stdlib_corpus(max_files=12))
    assert sum(d.domain in ("arithmetic", "dialogue", "facts") for d in docs) == 900
