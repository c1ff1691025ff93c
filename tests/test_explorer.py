"""The router explorer: bias-only balancing on skewed tokens, its figure and its widget."""
import math

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from minimoe.explorer import RoutingResult, plot_routing, router_explorer, simulate_routing

SMALL = dict(n_tokens=512, steps=40, skew=3.0)


def test_without_bias_updates_the_skew_stays():
    r = simulate_routing(16, 2, 1.25, 0.0, **SMALL)
    assert r.max_vio.shape == (40,) and r.loads.shape == (40, 16)
    assert r.max_vio.min() > 1.0, "clustered tokens overload a few experts"
    assert abs(r.max_vio[-10:].mean() - r.max_vio[:10].mean()) < 0.5, "nothing moves the routing"
    assert np.all(r.bias == 0)


def test_bias_updates_alone_rebalance():
    off = simulate_routing(16, 2, 1.25, 0.0, **SMALL)
    on = simulate_routing(16, 2, 1.25, 1e-2, **SMALL)
    assert on.max_vio[0] == pytest.approx(off.max_vio[0]), "same first batch, same routing before any update"
    assert on.max_vio[-10:].mean() < on.max_vio[0] / 3
    assert on.max_vio[-10:].mean() < off.max_vio[-10:].mean() / 3
    assert on.dropped[-10:].mean() < off.dropped[-10:].mean() / 3
    assert np.abs(on.bias).max() > 0


def test_capacity_drops_tokens_and_dropless_drops_none():
    tight = simulate_routing(8, 2, 0.5, 0.0, **SMALL)
    assert tight.capacity == math.ceil(0.5 * 512 * 2 / 8)
    # capacity factor < 1: even a perfect balance could keep at most half of the assignments
    assert np.all(tight.dropped >= 0.5 - 1e-9)
    assert not tight.kept.all()
    assert tight.kept.sum() == np.minimum(tight.loads[-1], tight.capacity).sum()
    free = simulate_routing(8, 2, None, 0.0, **SMALL)
    assert free.capacity is None and np.all(free.dropped == 0) and free.kept.all()


def test_drops_follow_gshard_priority_first_choices_first():
    r = simulate_routing(8, 2, 0.75, 0.0, **SMALL)
    first, second = r.assignment[:, 0], r.assignment[:, 1]
    full = [e for e in range(8) if not r.kept[first == e, 0].all()]  # experts that turned a first choice away
    assert full, "the capacity bites"
    for e in full:  # ... kept no second choice, and served their first choices in token order
        assert not r.kept[second == e, 1].any()
        kept = r.kept[first == e, 0]
        assert kept[:kept.sum()].all()


def test_loads_and_assignment_agree():
    r = simulate_routing(8, 3, 1.0, 1e-2, **SMALL)
    assert np.all(r.loads.sum(1) == 512 * 3)
    assert r.assignment.shape == (512, 3) and r.cluster.shape == (512,)
    assert np.array_equal(np.bincount(r.assignment.reshape(-1), minlength=8), r.loads[-1])
    assert all(len(set(row)) == 3 for row in r.assignment.tolist()), "k distinct experts per token"


def test_deterministic_for_a_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = simulate_routing(8, 2, 1.25, 1e-2, seed=3, **SMALL)
    assert torch.rand(1) == before
    b = simulate_routing(8, 2, 1.25, 1e-2, seed=3, **SMALL)
    c = simulate_routing(8, 2, 1.25, 1e-2, seed=4, **SMALL)
    for field in ("loads", "max_vio", "dropped", "assignment", "kept", "cluster", "bias"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert not np.array_equal(a.loads, c.loads)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="bias_update_speed"):
        simulate_routing(8, 2, 1.0, -1e-3)
    with pytest.raises(ValueError, match="top_k"):
        simulate_routing(4, 5, 1.0, 0.0)


def test_plot_routing_has_three_panels():
    for cf in (1.25, None):
        fig = plot_routing(simulate_routing(8, 2, cf, 1e-2, n_tokens=256, steps=5))
        assert isinstance(fig, matplotlib.figure.Figure)
        assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 3
        plt.close(fig)


def test_router_explorer_builds_a_widget():
    ipywidgets = pytest.importorskip("ipywidgets")
    ui = router_explorer(n_tokens=128, steps=3)
    assert isinstance(ui, ipywidgets.VBox)
    sliders = [w for w in _walk(ui) if isinstance(w, (ipywidgets.IntSlider, ipywidgets.FloatSlider,
                                                      ipywidgets.FloatLogSlider))]
    assert len(sliders) == 4
    assert any(isinstance(w, ipywidgets.Output) for w in _walk(ui))
    n_experts = next(w for w in sliders if w.description.startswith("experts"))
    top_k = next(w for w in sliders if w.description == "top-k")
    n_experts.value = 4
    assert top_k.max == 4
    plt.close("all")


def _walk(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _walk(child)


def test_result_type():
    assert isinstance(simulate_routing(4, 1, 1.0, 0.0, n_tokens=64, steps=2), RoutingResult)
