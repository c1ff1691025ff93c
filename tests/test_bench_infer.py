"""The article's inference benchmark (P2) as written, its defects, and the correct benchmark (minimoe.bench_infer).

Every model here is 2 layers x 32 wide with a 64-token context, and every timing is only checked for being
positive: what the tests pin down is what is counted, not how fast it runs.
"""
import pytest
import torch

from minimoe import MiniLM, ModelConfig
from minimoe import bench_infer
from minimoe.attention import kv_cache_bytes_per_token
from minimoe.bench_infer import (article_benchmark, article_defects, benchmark, cache_bytes_per_token, goals_table,
                                 mla_config, reference_goals, rows_table, sweep, text_prompts)

TEXT = ("The model reads every byte of text and learns which byte comes next, so a small network can still "
        "see structure in language when it trains for long enough on clean data. ") * 4
KINDS = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=1),
    "mla": dict(attention="mla"),
    "moe": dict(n_experts=4, top_k=2),
}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, **overrides)


@pytest.fixture
def model() -> MiniLM:
    torch.manual_seed(0)
    return MiniLM(tiny()).eval()


# ---- the listing as written ------------------------------------------------------------------


def test_article_benchmark_counts_prompt_tokens(model):
    r = article_benchmark(model, input_length=16, batch_size=2, max_length=24)
    assert r["generated"] == 8 and r["generated_tokens"] == 16
    assert r["tokens_counted"] == 2 * (16 + 8)
    assert r["latency_s"] > 0 and not r["synchronized"] and r["timed_runs"] == 1
    assert r["throughput_tokens_per_s"] * r["latency_s"] == pytest.approx(2 * (16 + 8))
    assert r["generated_tokens_per_s"] * r["latency_s"] == pytest.approx(2 * 8)
    assert r["scale"] == 16 / 4096


def test_article_benchmark_as_written_generates_nothing(model):
    r = article_benchmark(model)  # scaled 4096 / 2048 into a 64-token context: max_length < input_length
    assert r["input_length"] == round(4096 * 64 / 6144) and r["max_length"] == round(2048 * 64 / 6144)
    assert r["max_length"] <= r["input_length"]
    assert r["generated"] == 0 and r["nothing_generated"] and r["generated_tokens_per_s"] == 0
    assert r["tokens_counted"] == 8 * r["input_length"]  # the listing still prints a throughput: the prompt's
    assert r["throughput_tokens_per_s"] * r["latency_s"] == pytest.approx(8 * r["input_length"])
    assert "ValueError" in r["transformers_note"]
    assert article_benchmark(model, input_length=20, max_length=20, batch_size=1)["generated"] == 0


def test_article_prompt_ids_are_below_100():
    ids = bench_infer.article_prompt(4, 50, seed=1)
    assert ids.shape == (4, 50) and int(ids.min()) >= 0 and int(ids.max()) < 100


def test_article_defects(model):
    d = article_defects(model, batch_size=2, prompt_len=24, new_tokens=8, runs=3, text=TEXT)
    pc = d["prompt_counting"]
    assert pc["inflation"] == pytest.approx((24 + 8) / 8) == pytest.approx(pc["expected_inflation"])
    assert pc["listing_tokens_per_s"] > pc["generated_tokens_per_s"] > 0
    assert pc["correct_decode_tokens_per_s"] > 0 and pc["correct_ttft_ms"] > 0
    sr = d["single_run"]
    assert len(sr["single_s"]) == 3 and 0 < sr["min_s"] <= sr["max_s"] and sr["max_over_min"] >= 1
    assert sr["cv"] >= 0 and sr["synced_median_s"] > 0
    lo, hi = sr["listing_tokens_per_s_range"]
    assert lo <= pc["listing_tokens_per_s"] <= hi
    assert d["max_length"]["generated"] == 0
    assert 0 < d["token_ids"]["control_fraction"] < 1 and d["token_ids"]["note"]


def test_article_defects_default_sizes_keep_the_listings_proportions(model):
    d = article_defects(model, batch_size=1, runs=2, text=TEXT)
    assert (d["prompt_len"], d["new_tokens"]) == (64 * 2 // 3, 64 - 64 * 2 // 3)


# ---- the correct benchmark --------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_timed_loop_produces_generates_greedy_tokens(kind):
    torch.manual_seed(0)
    m = MiniLM(tiny(**KINDS[kind])).eval()
    prompt, _ = text_prompts(3, 12, seed=2, text=TEXT)
    out, prefill_s, decode_s, kv_bytes = bench_infer._timed_greedy(m, prompt, 9, None)
    assert torch.equal(out, m.generate(prompt, 9))
    assert prefill_s > 0 and decode_s > 0 and kv_bytes > 0
    assert benchmark(m, 2, 12, 6, repeats=1, text=TEXT)["matches_generate"]


def test_benchmark_fields(model):
    r = benchmark(model, batch_size=2, prompt_len=16, new_tokens=8, repeats=2, text=TEXT)
    for key in ("ttft_ms", "ttft_ms_min", "ttft_ms_max", "prefill_tokens_per_s", "decode_s", "decode_ms_per_step",
                "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max", "e2e_tokens_per_s",
                "kv_cache_bytes", "weight_bytes"):
        assert r[key] > 0, key
    assert r["ttft_ms_min"] <= r["ttft_ms"] <= r["ttft_ms_max"]
    assert r["decode_tokens_per_s_min"] <= r["decode_tokens_per_s"] <= r["decode_tokens_per_s_max"]
    assert r["matches_generate"] and r["prompt_source"].startswith("given text")
    # the cache holds prompt + new tokens - 1 positions (the last token is never fed back): 2 layers x (k, v)
    assert r["kv_cache_bytes"] == 2 * (16 + 8 - 1) * 2 * 2 * 32 * 4
    if r["peak_mem_bytes"] is not None:
        assert r["peak_mem_bytes"] >= r["run_mem_bytes"] >= 0 and r["mem_method"]


def test_benchmark_counts_generated_tokens_only(model):
    r = benchmark(model, batch_size=3, prompt_len=20, new_tokens=6, repeats=1, text=TEXT)
    assert r["generated_tokens"] == 3 * 6
    assert r["decode_tokens"] == 3 * (6 - 1)  # the first new token comes out of the prefill
    assert r["decode_tokens_per_s"] * r["decode_s"] == pytest.approx(3 * 5)
    assert r["decode_ms_per_step"] == pytest.approx(r["decode_s"] * 1e3 / 5)
    assert r["e2e_tokens_per_s"] * (r["ttft_ms"] / 1e3 + r["decode_s"]) == pytest.approx(3 * 6)


def test_benchmark_single_new_token_has_no_decode(model):
    r = benchmark(model, batch_size=1, prompt_len=8, new_tokens=1, repeats=1, text=TEXT)
    assert r["ttft_ms"] > 0 and r["decode_tokens"] == 0
    assert r["decode_tokens_per_s"] is None and r["decode_ms_per_step"] is None and r["matches_generate"]


def test_text_prompts_are_windows_of_the_text():
    ids, source = text_prompts(4, 10, seed=3, text=TEXT)
    assert ids.shape == (4, 10) and ids.dtype == torch.long and "given text" in source
    for row in ids:
        assert bytes(row.tolist()).decode() in TEXT


def test_text_prompts_fall_back_to_random_bytes(monkeypatch):
    def unavailable():
        raise OSError("no corpus")
    monkeypatch.setattr(bench_infer, "_held_out_stream", unavailable)
    ids, source = text_prompts(2, 16, seed=0)
    assert ids.shape == (2, 16) and int(ids.max()) < 256 and source.startswith("random bytes")


@pytest.mark.parametrize("kwargs, field", [
    (dict(batch_size=0), "batch_size"),
    (dict(prompt_len=0), "prompt_len"),
    (dict(new_tokens=0), "new_tokens"),
    (dict(prompt_len=65), "prompt_len"),
    (dict(prompt_len=60, new_tokens=8), "new_tokens"),
    (dict(repeats=0), "repeats"),
])
def test_benchmark_bad_input(model, kwargs, field):
    args = dict(batch_size=1, prompt_len=8, new_tokens=4, repeats=1, text=TEXT) | kwargs
    with pytest.raises(ValueError, match=field):
        benchmark(model, **args)


@pytest.mark.parametrize("call, field", [
    (lambda m: article_benchmark(m, input_length=65), "input_length"),
    (lambda m: article_benchmark(m, input_length=16, max_length=80), "max_length"),
    (lambda m: article_benchmark(m, batch_size=0), "batch_size"),
    (lambda m: article_defects(m, prompt_len=70), "prompt_len"),
    (lambda m: article_defects(m, batch_size=0), "batch_size"),
    (lambda m: reference_goals(config=tiny(), prompt_len=60, new_tokens=8), "new_tokens"),
])
def test_other_bad_input(model, call, field):
    with pytest.raises(ValueError, match=field):
        call(model)


# ---- sweep and tables --------------------------------------------------------------------------


def test_sweep_skips_combinations_beyond_the_context(model):
    rows = sweep(model, batch_sizes=(1, 2), prompt_lens=(8, 48), new_tokens=(20,), repeats=1, warmup=0, text=TEXT)
    assert len(rows) == 4
    measured = [r for r in rows if not r["skipped"]]
    skipped = [r for r in rows if r["skipped"]]
    assert [(r["batch_size"], r["prompt_len"]) for r in measured] == [(1, 8), (2, 8)]
    assert len(skipped) == 2 and all("48 + 20" in r["note"] and "64" in r["note"] for r in skipped)
    assert all(r["matches_generate"] and r["decode_tokens_per_s"] > 0 for r in measured)
    table = rows_table(rows)
    assert table.count("\n") == 1 + len(rows) and "skipped" in table and "TTFT ms" in table


# ---- the reference run ----------------------------------------------------------------------------


def test_mla_bytes_ratio_matches_the_hand_formula():
    cfg = ModelConfig(d_model=64, n_layers=3, n_heads=4, max_seq_len=32)
    mla = mla_config(cfg)
    assert (mla.attention, mla.d_model, mla.n_heads) == ("mla", 64, 4)
    mha_bytes = 2 * 3 * 4 * 16 * 4           # k and v, 3 layers, 4 heads of 16 dims, fp32
    mla_bytes = 3 * (64 // 4 + 16 // 2) * 4  # latent of d_model / 4 and a rotary key of head_dim / 2, fp32
    assert cache_bytes_per_token(cfg) == kv_cache_bytes_per_token(cfg) == mha_bytes == 1536
    assert cache_bytes_per_token(mla) == kv_cache_bytes_per_token(mla) == mla_bytes == 288
    # default MLA sizes at equal heads: (d/4 + d/(2H)) / (2d) = 1/8 + 1/(4H); the reference 6 heads give 1/6
    assert mla_bytes / mha_bytes == pytest.approx(1 / 8 + 1 / (4 * 4))
    big = bench_infer.BENCH_MODEL
    assert kv_cache_bytes_per_token(mla_config(big)) / kv_cache_bytes_per_token(big) == pytest.approx(1 / 6)


def test_reference_goals_on_a_tiny_stand_in():
    r = reference_goals(config=tiny(), prompt_len=12, new_tokens=8, repeats=1, text=TEXT)
    rows = {row["name"]: row for row in r["rows"]}
    assert set(rows) == {"kv_cache_speedup_b1", "kv_cache_speedup_b8", "decode_throughput_b8_over_b1",
                         "bf16_over_fp32_decode_b1", "mla_over_mha_cache_bytes"}
    for name, (goal, op) in bench_infer.REFERENCE_GOALS.items():
        assert rows[name]["goal"] == goal and rows[name]["op"] == op
        assert rows[name]["measured"] > 0 and isinstance(rows[name]["met"], bool)
    assert rows["bf16_over_fp32_decode_b1"]["measured"] > 0 and rows["bf16_over_fp32_decode_b1"]["met"] is None
    assert rows["mla_over_mha_cache_bytes"]["measured"] == pytest.approx(1 / 8 + 1 / (4 * 2))  # = 0.25: met
    assert rows["mla_over_mha_cache_bytes"]["met"] is True
    assert r["all_met"] == all(row["met"] for row in r["rows"] if row["met"] is not None)
    assert r["details"]["benchmark_b1_bf16"]["dtype"] == "bfloat16"
    assert r["details"]["benchmark_b1_bf16"]["matches_generate"]
    assert "kv_cache_speedup_b1" in goals_table(r)
