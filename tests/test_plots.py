"""The shared figures draw what they are given."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minimoe.plots import plot_seed_bands  # noqa: E402


def test_seed_bands_draw_the_mean_and_the_range():
    fig, ax = plt.subplots()
    runs = [([1, 2, 3], [3.0, 2.0, 1.0]), ([1.2, 2.2, 3.2], [4.0, 2.5, 1.5]), ([0.8, 1.8, 2.8], [3.5, 1.5, 0.5])]
    plot_seed_bands(ax, {"a": runs}, "x", "y")
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), [1, 2, 3])                  # xs averaged over seeds
    np.testing.assert_allclose(line.get_ydata(), [3.5, 2.0, 1.0])            # mean of the seeds
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.5) and band[:, 1].max() == pytest.approx(4.0)
    assert "mean of 3 seeds" in line.get_label()
    with pytest.raises(ValueError, match="same number of points"):
        plot_seed_bands(ax, {"b": [([1, 2], [1, 2]), ([1], [1])]}, "x", "y")
    plt.close(fig)
