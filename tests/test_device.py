import pytest

from minimoe.device import median_seconds


def test_median_seconds_calls_and_takes_the_median():
    calls = []
    t = median_seconds(lambda: calls.append(1), "cpu", repeats=3, warmup=2)
    assert len(calls) == 5 and t >= 0
    with pytest.raises(ValueError, match="repeats"):
        median_seconds(lambda: None, "cpu", repeats=0)


def test_peak_flops_is_measured_once_on_cpu():
    from minimoe.device import _PEAK_CACHE, peak_flops
    peak, source = peak_flops("cpu", "fp32")
    assert peak > 0 and source.startswith("measured (fp32 matmul")
    assert peak_flops("cpu", "fp32") == (peak, source)           # cached: the same number for the process
    assert len([k for k in _PEAK_CACHE if k[1] == "fp32"]) == 1
    with pytest.raises(ValueError, match="precision"):
        peak_flops("cpu", "fp16")
