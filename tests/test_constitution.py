"""minimoe.constitution: principles and critics, the critique-and-revise loop, its reliability, the supervised stage."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

from minimoe import MiniLM, ModelConfig
from minimoe import constitution as C
from minimoe import constitution_study as S
from minimoe.data import ByteTokenizer


class Scripted:
    """A generator that returns the given responses in turn (the last one forever) and records its calls."""

    def __init__(self, *responses, sleep: float = 0.0, fail_at: int | None = None, room: int | None = None):
        self.responses, self.sleep, self.fail_at, self.room = list(responses), sleep, fail_at, room
        self.calls = []  # (prompt, max_new_tokens, seed)

    def fits(self, prompt, max_new_tokens):
        return self.room is None or len(prompt) + max_new_tokens <= self.room

    def generate_text(self, prompt, max_new_tokens, temperature, seed):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("the model fell over")
        self.calls.append((prompt, max_new_tokens, seed))
        time.sleep(self.sleep)
        text = self.responses[min(len(self.calls) - 1, len(self.responses) - 1)]
        return text, len(text.encode())


def code_constitution():
    return C.Constitution.builtin("code")


def words_constitution(*terms):
    return C.Constitution([C.Principle("civil", "No insults.", C.banned_terms(terms or ("stupid",)))])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MiniLM(ModelConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=2, max_seq_len=48)).eval()


# ---- principles ----------------------------------------------------------------------------------------------
def test_principle_validation():
    with pytest.raises(ValueError, match="name"):
        C.Principle("", "x", lambda r, p: [])
    with pytest.raises(ValueError, match="callable"):
        C.Principle("a", "x", "not a function")
    with pytest.raises(ValueError, match="kind"):
        C.Principle("a", "x", lambda r, p: [], kind="vibes")


def test_a_critic_that_raises_is_a_failed_check_not_a_crash():
    def broken(response, prompt):
        raise KeyError("boom")
    v = C.Principle("broken", "x", broken).check("anything")
    assert len(v) == 1 and v[0].error and "KeyError" in v[0].message and "boom" in v[0].message
    # a critic returning garbage is a failed check too
    assert C.Principle("odd", "x", lambda r, p: [42]).check("x")[0].error


def test_messages_and_spans_become_violations():
    p = C.Principle("p", "x", lambda r, p: ["plain", ("located", (2, 5))])
    v = p.check("abcdefg")
    assert [x.message for x in v] == ["plain", "located"] and v[0].span is None and v[1].span == (2, 5)
    assert all(x.principle == "p" and not x.error for x in v)


# ---- critics -------------------------------------------------------------------------------------------------
def test_compiles_checks_prompt_plus_response_and_locates_the_line():
    crit = C.compiles()
    assert crit("x + 1\n", "def f(x):\n    return ") == []
    [(msg, span)] = crit("x +\n", "def f(x):\n    return ")
    assert "line 2" in msg and span == (0, 4)
    [(msg, span)] = crit("1\ny = (\n", "x = ")
    assert span == (2, 8)  # the fault is on the response's second line


@pytest.mark.parametrize("code, found", [
    ("os.system(cmd)\n", "calls os.system"),
    ("subprocess.run(['ls'])\n", "calls subprocess.run"),
    ("eval(cmd)\n", "calls eval"),
    ("exec('x = 1') or 1\n", "calls exec"),
    ("1\n    import subprocess\n", "imports subprocess"),
    ("1\n    from os import system\n", "imports os.system"),
])
def test_dangerous_calls_are_found_in_the_syntax_tree(code, found):
    msgs = [m for m, _ in C.no_dangerous_calls()(code, "def run(cmd):\n    return ")]
    assert found in msgs


def test_dangerous_calls_ignore_lookalikes_and_the_prompt():
    crit = C.no_dangerous_calls()
    assert crit("evaluate(x) + my.eval_count + len(system)\n", "def f(x, my, system):\n    return ") == []
    # the prompt's own import is not the response's doing
    assert crit("x\n", "import subprocess\n\ndef f(x):\n    return ") == []
    # code that does not parse is searched as text
    [(msg, span)] = crit("eval(x +\n", "def f(x):\n    return ")
    assert "eval" in msg and "does not parse" in msg and span[0] == 0


def test_pep8_reports_only_the_response_lines():
    prompt = "def f(x):\n    return "
    assert C.pep8_clean()("x + 1\n", prompt) == []
    msgs = [m for m, _ in C.pep8_clean()("x  +1\n", prompt)]
    assert any("E221" in m or "E225" in m for m in msgs)
    long = "x + " + " + ".join(["x"] * 40) + "\n"
    assert any("E501" in m for m, _ in C.pep8_clean()(long, prompt))
    assert C.pep8_clean(max_line_length=200)(long, prompt) == []


def test_text_critics():
    assert C.banned_terms(["hate"])("I hateful things", "") == []
    [(msg, span)] = C.banned_terms(["hate"])("We HATE it", "")
    assert "HATE" in msg and span == (3, 7)
    assert C.max_length(chars=5)("12345", "") == []
    [(msg, span)] = C.max_length(chars=5)("1234567", "")
    assert span == (5, 7)
    [(msg, span)] = C.max_length(lines=1)("a\nb\n", "")
    assert span == (2, 4) and C.max_length(lines=1)("a\n", "") == []
    with pytest.raises(ValueError):
        C.max_length()
    fmt = C.required_format(r"So the answer is \d+\.$", "a conclusion")
    assert fmt(" 1 + 2 = 3. So the answer is 3.\n", "") == []
    assert fmt("3", "") == ["not in the required format: a conclusion"]
    grounded = C.grounded(ignore=["So"])
    assert grounded(" Ann, Bo. So the answer is Ann.", "Ann is taller than Bo.") == []
    [(msg, span)] = grounded(" Ann, Zed.", "Ann is taller than Bo.")
    assert "Zed" in msg and span == (6, 10)


def test_likelihood_critic_scores_with_a_model(tiny_model):
    bpb = C.bits_per_byte(tiny_model, "hello", "say ")
    assert math.isfinite(bpb) and 0 < bpb < 20
    assert C.bits_per_byte(tiny_model, "", "x") == 0.0
    assert C.likelihood_critic(tiny_model, 1e9)("hello", "say ") == []
    [msg] = C.likelihood_critic(tiny_model, 0.0)("hello", "say ")
    assert "bits/byte" in msg
    # longer than the context: the response is kept, the prompt's start dropped
    assert math.isfinite(C.bits_per_byte(tiny_model, "y" * 30, "x" * 100))


# ---- constitutions -------------------------------------------------------------------------------------------
def test_constitution_validation_and_order():
    with pytest.raises(ValueError, match="at least one"):
        C.Constitution([])
    p = C.Principle("a", "x", lambda r, q: [])
    with pytest.raises(ValueError, match="unique"):
        C.Constitution([p, p])
    with pytest.raises(ValueError, match="Principle"):
        C.Constitution(["a"])
    both = C.Constitution([C.Principle("one", "x", lambda r, q: ["1"]), C.Principle("two", "x", lambda r, q: ["2"])])
    assert [v.principle for v in both.critique("r")] == ["one", "two"]
    assert "1. **one**" in both.describe()


def test_constitution_files(tmp_path):
    d = {"name": "mine", "principles": [
        {"name": "short", "statement": "At most 3 characters.", "critic": "max_length", "args": {"chars": 3}},
        {"name": "civil", "statement": "No insults.", "critic": "banned_terms", "args": {"terms": ["dumb"]}}]}
    (tmp_path / "c.json").write_text(json.dumps(d))
    c = C.Constitution.from_file(tmp_path / "c.json")
    assert c.name == "mine" and len(c) == 2
    assert [v.principle for v in c.critique("dumb!")] == ["short", "civil"]
    with pytest.raises(ValueError, match="unknown critic 'nope'"):
        C.Constitution.from_dict({"principles": [{"name": "a", "statement": "b", "critic": "nope"}]})
    with pytest.raises(ValueError, match="needs 'name'"):
        C.Constitution.from_dict({"principles": [{"name": "a"}]})
    with pytest.raises(ValueError, match="at least one"):
        C.Constitution.from_dict({"principles": []})
    # a model-based critic is named through `critics`
    extra = {"always": lambda: (lambda r, p: ["flagged"])}
    m = C.Constitution.from_dict({"principles": [{"name": "m", "statement": "s", "critic": "always"}]}, critics=extra)
    assert m.principles[0].kind == "model" and m.critique("x")[0].message == "flagged"


def test_yaml_constitution(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("name: y\nprinciples:\n  - name: short\n    statement: Short.\n"
                                     "    critic: max_length\n    args: {chars: 2}\n")
    assert C.Constitution.from_file(tmp_path / "c.yaml").critique("abc")[0].principle == "short"


def test_builtin_constitutions():
    code = C.Constitution.builtin("code")
    assert [p.name for p in code] == ["compiles", "no-dangerous-calls", "pep8"]
    assert code.critique("x + 1\n", "def f(x):\n    return ") == []
    assert {v.principle for v in code.critique("os.system(x)\n", "def f(x):\n    return ")} == {"no-dangerous-calls"}
    arith = C.Constitution.builtin("arithmetic")
    assert arith.critique(" 7 * 5 = 35. 9 + 35 = 44. So the answer is 44.\n", "Q: 9 + 7 * 5 = ?\nA:") == []
    with pytest.raises(ValueError, match="no built-in"):
        C.Constitution.builtin("nope")


# ---- the loop ------------------------------------------------------------------------------------------------
def test_bad_settings_are_value_errors():
    gen = Scripted("x")
    for kw in (dict(max_rounds=0), dict(strategy="pray"), dict(n=0), dict(time_budget_s=0), dict(max_new_tokens=0),
               dict(temperature=-1)):
        with pytest.raises(ValueError):
            C.SelfCorrector(gen, code_constitution(), **kw)
    with pytest.raises(ValueError, match="Constitution"):
        C.SelfCorrector(gen, [C.Principle("a", "x", lambda r, p: [])])
    with pytest.raises(TypeError):
        C.SelfCorrector(object(), code_constitution())
    with pytest.raises(ValueError, match="prompt"):
        C.SelfCorrector(gen, code_constitution())(b"bytes")


def test_loop_stops_when_clean_and_keeps_the_trace():
    gen = Scripted("eval(x)\n", "x + 1\n")
    res = C.SelfCorrector(gen, code_constitution(), strategy="resample", max_rounds=5)("def f(x):\n    return ")
    assert res.stopped == "clean" and res.passed and res.output == "x + 1\n" and len(res.rounds) == 2
    assert res.rounds[0].findings[0].principle == "no-dangerous-calls" and res.rounds[1].violations == []
    assert res.tokens == len("eval(x)\n") + len("x + 1\n") and res.seconds > 0
    assert [c[0] for c in gen.calls] == ["def f(x):\n    return "] * 2  # resample: the prompt alone


def test_max_rounds_bounds_every_run():
    res = C.SelfCorrector(Scripted("eval(x)\n"), code_constitution(), max_rounds=3)("def f(x):\n    return ")
    assert res.stopped == "max_rounds" and len(res.rounds) == 3 and not res.passed
    assert res.output == "eval(x)\n" and res.chosen == 0  # equals: the earliest


def test_the_output_is_the_round_with_fewest_findings():
    gen = Scripted("eval(x) +\n", "eval(x)\n", "exec(x) +\n")
    res = C.SelfCorrector(gen, code_constitution(), "resample", max_rounds=3)("def f(x):\n    return ")
    assert res.chosen == 1 and res.output == "eval(x)\n"


def test_critique_strategy_writes_the_critique_above_the_prompt():
    gen = Scripted("eval(x)\n", "x\n")
    res = C.SelfCorrector(gen, code_constitution(), "critique", max_rounds=2)("def f(x):\n    return ")
    second = gen.calls[1][0]
    assert second == "# no-dangerous-calls: calls eval\ndef f(x):\n    return " == res.rounds[1].prompt
    gen = Scripted("eval(x)\n", "x\n")
    C.SelfCorrector(gen, code_constitution(), "critique", 2, critique_format=C.brief_critique)("def f(x):\n    return ")
    assert gen.calls[1][0].startswith("# revise: no-dangerous-calls\n")


def test_a_critique_that_does_not_fit_the_context_is_shortened_then_dropped():
    cons = C.Constitution([C.Principle("a", "x", lambda r, p: ["first problem", "second problem"])])
    prompt = "p" * 10
    for room, head in ((200, "# a: first problem\n# a: second problem\n"), (50, "# a: first problem\n"), (20, "")):
        gen = Scripted("r")
        C.SelfCorrector(gen, cons, "critique", max_rounds=2, max_new_tokens=5)(prompt) if room else None
        gen = Scripted("r", room=room)
        C.SelfCorrector(gen, cons, "critique", max_rounds=2, max_new_tokens=5)(prompt)
        assert gen.calls[1][0] == head + prompt


def test_span_strategy_keeps_the_text_before_the_fault():
    gen = Scripted("You are stupid and wrong.", "kind.")
    res = C.SelfCorrector(gen, words_constitution(), "span", max_rounds=3, max_new_tokens=40)("Say: ")
    assert gen.calls[1][0] == "Say: You are " and gen.calls[1][1] == 40 - len("You are ")
    assert res.output == "You are kind." and res.passed and res.rounds[1].tokens == len("kind.")


def test_best_of_n_draws_n_and_keeps_the_best():
    gen = Scripted("stupid", "stupid stupid", "fine", "stupid")
    res = C.SelfCorrector(gen, words_constitution(), "best_of_n", max_rounds=1, n=4)("Say: ")
    assert res.output == "fine" and res.passed and res.rounds[0].candidates == 4 and len(gen.calls) == 4
    assert res.tokens == sum(len(t) for t in ("stupid", "stupid stupid", "fine", "stupid"))


def test_strategies_share_their_draws():
    """critique and resample draw round r with the same seed; best_of_n(n=k) sees resample's first k seeds."""
    seeds = {}
    for strategy, rounds, n in (("resample", 4, 1), ("critique", 4, 1), ("span", 4, 1), ("best_of_n", 1, 4)):
        gen = Scripted("stupid")
        C.SelfCorrector(gen, words_constitution(), strategy, rounds, n=n)("Say: ", seed=7)
        seeds[strategy] = [c[2] for c in gen.calls]
    assert len(set(seeds["resample"])) == 4
    assert seeds["resample"] == seeds["critique"] == seeds["span"] == seeds["best_of_n"]
    gen = Scripted("stupid")
    C.SelfCorrector(gen, words_constitution(), "resample", 2)("Say: ", seed=8)
    assert gen.calls[0][2] != seeds["resample"][0]


def test_a_failing_critic_never_crashes_the_loop():
    def broken(response, prompt):
        raise ZeroDivisionError("critic bug")
    cons = C.Constitution([C.Principle("broken", "x", broken), C.Principle("civil", "x", C.banned_terms(["stupid"]))])
    res = C.SelfCorrector(Scripted("stupid", "nice"), cons, max_rounds=4)("Say: ")
    assert res.stopped == "failed_checks" and len(res.rounds) == 2 and not res.passed
    assert res.violations[0].error and "critic bug" in res.violations[0].message
    summary = S.summarize([res])
    assert summary["failed_checks"] == 1 and summary["violation_rate"] == 0.0


def test_a_failing_generator_ends_the_run_with_its_trace():
    res = C.SelfCorrector(Scripted("stupid", fail_at=1), words_constitution(), max_rounds=4)("Say: ")
    assert res.stopped == "error" and "fell over" in res.error and len(res.rounds) == 1 and res.output == "stupid"
    res = C.SelfCorrector(Scripted("x", fail_at=0), words_constitution())("Say: ")
    assert res.rounds == [] and res.output == "" and not res.passed and res.violations == []


def test_the_time_budget_bounds_every_run():
    gen = Scripted("stupid", sleep=0.05)
    res = C.SelfCorrector(gen, words_constitution(), max_rounds=50, time_budget_s=0.12)("Say: ")
    assert res.stopped == "time_budget" and 2 <= len(res.rounds) <= 4 and res.rounds
    gen = Scripted("stupid", sleep=0.05)
    res = C.SelfCorrector(gen, words_constitution(), "best_of_n", max_rounds=3, n=20, time_budget_s=0.12)("Say: ")
    assert res.rounds[0].candidates < 20 and len(res.rounds) == 1 and res.stopped == "time_budget"


def test_summarize_rates_and_costs():
    gen = Scripted("eval(y)\n", "x\n", "eval(y)\n", "eval(y)\n")
    fix = C.SelfCorrector(gen, code_constitution(), "resample", max_rounds=2)
    items = [S.TaskItem("def f(x):\n    return ", "x"), S.TaskItem("def g(x):\n    return ", "x")]
    results = S.run_items(fix, items)
    s = S.summarize(results, items, S.code_passed)
    assert s["violation_rate_first"] == 1.0 and s["violation_rate"] == 0.5
    assert s["pass_rate_first"] == 0.0 and s["pass_rate"] == 0.5
    assert s["revision_rounds"] == 2 and s["tokens_per_revision"] == (2 + 8) / 2
    assert s["extra_tokens"] == s["tokens"] - 8 and s["by_principle"]["no-dangerous-calls"] == 0.5
    with pytest.raises(ValueError):
        S.summarize([])
    with pytest.raises(ValueError):
        S.summarize(results, None, S.code_passed)


def test_compare_paired():
    c = S.compare_paired([0.5, 0.2, 0.3], [0.8, 0.5, 0.55], ("after", "before"))
    assert c["verdict"] == "after lower" and c["lower_in"] == 3 and abs(c["diff"] + 0.2833) < 1e-3
    assert S.compare_paired([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])["verdict"] == "tie"
    assert S.compare_paired([0.1, 0.9, 0.5], [0.5, 0.5, 0.5])["verdict"] == "tie"
    with pytest.raises(ValueError):
        S.compare_paired([1, 2], [1, 2])


# ---- generators ----------------------------------------------------------------------------------------------
def test_minilm_generator(tiny_model):
    gen = C.MiniLMGenerator(tiny_model)
    text, n = gen.generate_text("abc", 8, temperature=1.0, seed=3)
    assert isinstance(text, str) and 1 <= n <= 8
    assert gen.generate_text("abc", 8, temperature=1.0, seed=3) == (text, n)
    long_text, _ = gen.generate_text("x" * 200, 5, temperature=1.0, seed=0)  # keeps the prompt's end, no error
    assert gen.fits("x" * 10, 30) and not gen.fits("x" * 40, 10)
    stop = C.MiniLMGenerator(tiny_model, stop="a")
    for seed in range(5):
        t, n = stop.generate_text("", 40, temperature=1.5, seed=seed)
        assert "a" not in t[:-1] and n <= 40


def test_transformers_model_through_the_same_loop():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="tokenizer"):
        C.as_generator(hf)
    gen = C.as_generator(hf, tokenizer=tok)
    state = torch.get_rng_state()
    text, n = gen.generate_text("abc", 6, temperature=1.0, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone
    assert (text, n) == gen.generate_text("abc", 6, temperature=1.0, seed=1) and n == 6
    assert gen.generate_text("abc", 4, temperature=0.0, seed=0)[1] == 4
    assert gen.fits("a" * 10, 10) and not gen.fits("a" * 60, 10)
    res = C.SelfCorrector(hf, words_constitution("zzz"), tokenizer=tok, max_new_tokens=6)("abc")
    assert res.stopped == "clean" and res.rounds[0].tokens == 6


# ---- the supervised stage and the book's tasks ----------------------------------------------------------------
def test_fine_tune_copies_trains_and_caches(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(ValueError):
        C.fine_tune(tiny_model, [])
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    pairs = [("Q: 1 + 1 = ?\nA:", " 2.\n"), ("Q: 2 + 2 = ?\nA:", " 4.\n")] * 3
    tuned = C.fine_tune(tiny_model, pairs, steps=3, batch_size=2, cache_dir=tmp_path)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())  # the base is untouched
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    import minimoe.train
    monkeypatch.setattr(minimoe.train, "train", lambda *a, **k: pytest.fail("trained again instead of loading"))
    again = C.fine_tune(tiny_model, pairs, steps=3, batch_size=2, cache_dir=tmp_path)
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in again.state_dict().items())


def test_studies_run_and_cache(tiny_model, tmp_path, monkeypatch):
    items = [S.TaskItem("Q: 1 + 1 = ?\nA:", "2"), S.TaskItem("Q: 2 + 2 = ?\nA:", "4")]
    cons = C.Constitution([C.Principle("short", "x", C.max_length(chars=3))])
    kw = dict(stop="\n", max_new_tokens=6, temperature=1.0)
    study = S.strategy_study([tiny_model] * 3, cons, items, S.arithmetic_passed, max_rounds=2, cache_dir=tmp_path, **kw)
    assert set(study) == set(C.STRATEGIES) and all(len(v) == 3 for v in study.values())
    first = {s: [x["violation_rate_first"] for x in v] for s, v in study.items() if s != "best_of_n"}
    assert first["critique"] == first["resample"] == first["span"]  # the same first draws
    assert [x["violation_rate"] for x in study["best_of_n"]] == [x["violation_rate"] for x in study["resample"]]
    monkeypatch.setattr(S, "run_items", lambda *a, **k: pytest.fail("ran again instead of reading the cache"))
    again = S.strategy_study([tiny_model] * 3, cons, items, S.arithmetic_passed, max_rounds=2, cache_dir=tmp_path, **kw)
    assert again == json.loads(json.dumps(study))
    monkeypatch.undo()
    ft = S.finetune_study([tiny_model], cons, items, items, S.arithmetic_passed, max_rounds=3, steps=2, **kw)
    assert len(ft["pairs"]) == 1 and len(ft["revisions"]) == 1


def test_a_seed_without_clean_pairs_keeps_its_base_model(tiny_model, monkeypatch):
    """A weak model can fail every prompt it is asked to collect from: that seed has nothing to learn from, so its
    "fine-tuned" model is the base model, measured as it is, and the study's per-seed lists stay complete."""
    items = S.arithmetic_items(3)
    never = C.Constitution([C.Principle("never", "nothing passes", C.max_length(chars=0))])
    kw = dict(stop="\n", max_new_tokens=4, temperature=1.0)
    monkeypatch.setattr(S, "fine_tune", lambda *a, **k: pytest.fail("fine-tuned on no pairs"))
    ft = S.finetune_study([tiny_model, tiny_model], never, items, items, S.arithmetic_passed, max_rounds=2, steps=2,
                          **kw)
    assert ft["pairs"] == [0, 0]
    assert all(s is not None for s in ft["revisions"] + ft["drafts"]) and len(ft["revisions"]) == 2
    base = S.strategy_study([tiny_model, tiny_model], never, items, S.arithmetic_passed, strategies=("resample",),
                            max_rounds=1, **kw)["resample"]
    assert [s["violation_rate"] for s in ft["revisions"]] == [s["violation_rate_first"] for s in base]


def test_arithmetic_task():
    items = S.arithmetic_items(5)
    assert items == S.arithmetic_items(5) and S.arithmetic_items(3, start=2) == items[2:]
    for it in items:
        assert it.prompt.startswith("Q: ") and it.prompt.endswith("= ?\nA:") and it.prompt.count(" ") <= 8
        assert it.answer.lstrip("-").isdigit()
    it = S.TaskItem("Q: 9 + 7 * 5 = ?\nA:", "44")
    assert S.arithmetic_passed(it, " 7 * 5 = 35. 9 + 35 = 44. So the answer is 44.\n")
    assert not S.arithmetic_passed(it, " So the answer is 45.") and not S.arithmetic_passed(it, " 44")


def test_code_task():
    items = S.code_items(3)
    assert items[0].prompt.endswith("    return ") and items[0].answer == "values"
    assert S.code_items(1, start=2) == items[2:]
    with pytest.raises(ValueError):
        S.code_items(len(S.CODE_FUNCTIONS) + 1)
    mean = items[0]
    assert S.code_passed(mean, "sum(values) / len(values)\n")
    assert not S.code_passed(mean, "None\n")            # compiles, but ignores its input
    assert not S.code_passed(mean, "the\n")             # compiles, but `the` is undefined
    assert not S.code_passed(mean, "values +\n")        # does not compile
    assert S.code_items(30)[29].answer == "d,key,default"
