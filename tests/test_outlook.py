"""Chapter 6's library: power-law fits and their seed bootstrap, the dated timeline, and the advisor's rules."""
import math

import numpy as np
import pytest

from minimoe import advisor, outlook, scaling
from minimoe.advisor import Fact


def test_power_law_fit_recovers_exact_parameters():
    c = np.geomspace(1e10, 1e12, 5)
    fit = scaling.fit_power_law(c, 50.0 * c ** -0.07)
    assert math.isclose(fit.a, 50.0, rel_tol=1e-9) and math.isclose(fit.b, 0.07, rel_tol=1e-9)
    assert math.isclose(float(fit(1e11)), 50.0 * 1e11 ** -0.07)
    for bad in [([1, 1], [2, 3]), ([1, 2], [0, 1]), ([1, 2, 3], [1, 2])]:
        with pytest.raises(ValueError):
            scaling.fit_power_law(*bad)


def _points(a, b, noise, widths=(32, 64, 96)):
    rng = np.random.default_rng(0)
    return [{"width": w, "flops": 1e9 * w ** 2, "bpb": a * (1e9 * w ** 2) ** -b * (1 + noise * rng.uniform(-1, 1))}
            for w in widths for _ in range(3)]


def test_bootstrap_enumerates_one_run_per_width():
    fits = scaling.bootstrap(_points(40, 0.05, 0.02))
    assert len(fits) == 27
    lo, mid, hi = scaling.quantiles([f.b for f in fits])
    assert lo <= 0.05 <= hi or abs(mid - 0.05) < 0.01
    with pytest.raises(ValueError, match="two or more widths"):
        scaling.bootstrap(_points(40, 0.05, 0.0, widths=(32,)))


def test_moe_advantage_sign_and_band():
    dense = scaling.bootstrap(_points(40, 0.05, 0.0))
    better = scaling.bootstrap(_points(36, 0.05, 0.0))  # 10% lower loss everywhere
    band = scaling.moe_advantage(dense, better, [1e12, 1e13])
    assert np.allclose(band, 0.1)
    assert np.all(scaling.moe_advantage(better, dense, [1e12]) < 0)
    wide = scaling.prediction_band(scaling.bootstrap(_points(40, 0.05, 0.05)), [1e12, 1e15])
    assert wide[2][1] / wide[0][1] > wide[2][0] / wide[0][0]  # the band widens away from the data


def test_timeline_covers_the_articles_predictions_and_is_consistent():
    assert [p.year for p in outlook.PREDICTIONS] == [2023, 2024, 2025, 2026, 2027]
    outlook.check()
    names = outlook.milestones_by_name()
    assert len(names) == len(outlook.MILESTONES)
    assert all(m.source for m in outlook.MILESTONES)
    verdicts = {"came true", "came true in part", "not checkable", "not yet due"}
    assert {p.verdict for p in outlook.PREDICTIONS} <= verdicts


def test_timeline_check_rejects_unsupported_verdicts(monkeypatch):
    bad = outlook.Prediction(2020, "x", "came true", ("Kimi K2",), "later than its year")
    monkeypatch.setattr(outlook, "PREDICTIONS", (bad,))
    with pytest.raises(ValueError, match="without a milestone"):
        outlook.check()


def _evidence(overhead=1.8, gain=(-0.02, 0.0, 0.02), quality="tie"):
    src = "x.ipynb"
    return {"quality per FLOP": Fact(quality, "", src, ""), "MoE stored / active": Fact(1.8, "x", src, ""),
            "MoE / dense latency, batch 1": Fact(overhead, "x", src, ""),
            "MoE advantage at our largest compute": Fact(gain, "", src, ""),
            "knowledge, MoE vs dense": Fact("tie", "", src, ""),
            "int8 bits per weight": Fact(8.5, "bits", src, ""), "int8 bpb change": Fact(0.002, "", src, ""),
            "int4 g32 bits per weight": Fact(4.5, "bits", src, ""), "int4 g32 bpb change": Fact(0.02, "", src, "")}


def test_advisor_rules():
    e = _evidence()
    a = {x.decision: x for x in advisor.advise(e, memory_gb=24, latency_ms=20, batch_size=1, hardware="1 GPU")}
    assert a["architecture"].choice == "dense" and "1.80x" in a["architecture"].because
    assert a["precision"].choice == "bf16"  # 7B x 16 bits = 14 GB <= 0.8 x 24 GB; a GPU never gets fp32
    assert a["parallel plan"].choice == "single device"
    a = {x.decision: x for x in advisor.advise(e, memory_gb=6, latency_ms=20, batch_size=1, hardware="1 GPU")}
    assert a["precision"].choice == "int4"  # 7B at 4.5 bits = 3.9 GB <= 4.8 GB
    a = {x.decision: x for x in advisor.advise(_evidence(gain=(0.01, 0.03, 0.05)), memory_gb=640, latency_ms=500,
                                               batch_size=64, hardware="8 GPUs", active_params_b=70)}
    assert a["architecture"].choice == "MoE" and a["parallel plan"].choice == "expert parallel x8"
    roomy = {h: {x.decision: x.choice for x in advisor.advise(e, 1000, 20, 1, h)}["precision"]
             for h in ("CPU", "1 GPU")}
    assert roomy == {"CPU": "fp32", "1 GPU": "bf16"}
    a = {x.decision: x for x in advisor.advise(e, memory_gb=1, latency_ms=20, batch_size=1, hardware="CPU")}
    assert a["precision"].choice == "does not fit"
    for bad in [dict(hardware="TPU"), dict(batch_size=0), dict(memory_gb=-1)]:
        with pytest.raises(ValueError):
            advisor.advise(e, **{**dict(memory_gb=24, latency_ms=20, batch_size=1, hardware="CPU"), **bad})
    rows = advisor.advice_rows(e, [dict(memory_gb=24, latency_ms=20, batch_size=1, hardware="CPU")])
    assert rows[0]["architecture"] == "dense" and rows[0]["memory_gb"] == 24


def test_timeline_plot_draws():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    outlook.plot_timeline(ax)
    fig.canvas.draw()  # text and dates are only converted when the figure is drawn
    assert len(ax.texts) == len(outlook.PREDICTIONS) + len(outlook.MILESTONES)  # labels and annotations
    plt.close(fig)


def test_advisor_widget_shows_html_that_follows_its_controls(monkeypatch):
    """The advice renders as HTML (Markdown stays raw text in a saved widget) and changes with the sliders."""
    pytest.importorskip("ipywidgets")
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    e = _evidence()
    ui = advisor.advisor_widget(e)
    memory = ui.children[0].children[0]
    memory.value = 1   # too small for any precision
    assert len(shown) == 2 and all(isinstance(x, IPython.display.HTML) for x in shown)
    before, after = (x.data for x in shown)
    assert "<b>" in before and "**" not in before and "<code>x.ipynb</code>" in before
    assert "does not fit" in after and "does not fit" not in before
