import pytest

from minimoe.device import median_seconds


def test_median_seconds_calls_and_takes_the_median():
    calls = []
    t = median_seconds(lambda: calls.append(1), "cpu", repeats=3, warmup=2)
    assert len(calls) == 5 and t >= 0
    with pytest.raises(ValueError, match="repeats"):
        median_seconds(lambda: None, "cpu", repeats=0)
