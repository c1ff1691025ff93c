import pytest

from minimoe.report import compare_seeds, markdown_table, mean_std


def test_markdown_table():
    md = markdown_table([{"a": "x|y", "b": 1234.5}], {"a": "name", "b": "value:"}, {"b": ",.0f"})
    assert md.splitlines() == ["| name | value |", "|---|---:|", "| x\\|y | 1,234 |"]


def test_mean_std_and_compare_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5]) == (5.0, 0.0)
    far = compare_seeds([1.0, 1.1, 1.2], [2.0, 2.1, 2.2], names=("bias", "aux"))
    assert far["verdict"] == "bias lower" and far["diff"] == pytest.approx(-1.0)
    assert compare_seeds([2.0, 2.1, 2.2], [1.0, 1.1, 1.2], names=("bias", "aux"))["verdict"] == "aux lower"
    close = compare_seeds([1.0, 1.3, 1.6], [1.1, 1.2, 1.4])  # |diff| 0.07 < spread 0.6
    assert close["verdict"] == "tie" and close["spread"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="three seeds"):
        compare_seeds([1.0, 2.0], [1.0, 2.0, 3.0])
