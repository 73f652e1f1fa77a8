import math

import pytest

from openmae.engine.schedule import absolute_lr, warmup_cosine_lr


def test_warmup_is_linear_from_zero():
    assert warmup_cosine_lr(0, total=100, warmup=10, peak_lr=1.0) == 0.0
    assert warmup_cosine_lr(5, total=100, warmup=10, peak_lr=1.0) == pytest.approx(0.5)


def test_peak_at_end_of_warmup_then_half_cosine_to_min():
    assert warmup_cosine_lr(10, total=100, warmup=10, peak_lr=2.0, min_lr=0.2) == pytest.approx(2.0)
    middle = warmup_cosine_lr(55, total=100, warmup=10, peak_lr=2.0, min_lr=0.2)
    assert middle == pytest.approx(0.2 + 1.8 * 0.5)
    assert warmup_cosine_lr(100, total=100, warmup=10, peak_lr=2.0, min_lr=0.2) == pytest.approx(0.2)
    quarter = warmup_cosine_lr(32.5, total=100, warmup=10, peak_lr=1.0)
    assert quarter == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_no_warmup_and_past_the_end():
    assert warmup_cosine_lr(0, total=10, warmup=0, peak_lr=1.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(20, total=10, warmup=0, peak_lr=1.0, min_lr=0.1) == pytest.approx(0.1)


def test_linear_scaling_rule():
    assert absolute_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert absolute_lr(1e-3, 256) == pytest.approx(1e-3)
