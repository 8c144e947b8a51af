"""The cost model and admission arithmetic of service/capacity.py (the server-level behaviour is
in tests/test_admission.py)."""

from __future__ import annotations

import grpc
import pytest

from service.capacity import BATCH_SHARE, HEADROOM, Admission, CostModel, expected_fps
from service.errors import ServiceError


def test_the_cost_model_fits_fixed_and_per_frame_cost_from_observed_batches() -> None:
    cost = CostModel()
    for _ in range(5):
        for batch in (1, 2, 4, 8):
            cost.observe(batch, 0.010 + 0.040 * batch)
    assert cost.fixed == pytest.approx(0.010, abs=1e-6)
    assert cost.per_frame == pytest.approx(0.040, abs=1e-6)
    # A 200 ms budget lets one batch cost 50 ms: (50 - 10) / 40 -> batch 1.
    assert cost.max_batch(0.200 * BATCH_SHARE, 16) == 1
    assert cost.max_batch(1.0, 16) == 16 and cost.max_batch(0.001, 16) == 1
    assert cost.capacity(0.200, 16) == pytest.approx(1 / 0.050)


def test_the_cost_model_follows_a_backend_that_got_slower() -> None:
    cost = CostModel()
    for _ in range(40):
        cost.observe(4, 0.1)
    for _ in range(200):
        cost.observe(4, 0.4)
    assert cost.cost(4) == pytest.approx(0.4, rel=0.05)


def test_admission_reserves_live_frame_rates_against_capacity() -> None:
    cost = CostModel()
    cost.observe(1, 0.01)  # 100 frames/s
    admission = Admission(cost=cost, budget=0.2, max_batch=16)
    capacity = admission.capacity
    assert capacity == pytest.approx(100.0)
    reserved = [admission.admit(25.0) for _ in range(3)]
    with pytest.raises(ServiceError) as refused:
        admission.admit(25.0)  # 100 > 0.9 x 100
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.retry_after and "live capacity" in refused.value.message
    admission.release(reserved[0])
    admission.admit(10.0)
    assert admission.committed == pytest.approx(60.0) and admission.committed <= HEADROOM * capacity
    # A generator in two lanes runs two such calls at once: twice the capacity.
    lanes = Admission(cost=cost, budget=0.2, max_batch=16)
    lanes.lanes = 2
    assert lanes.capacity == pytest.approx(200.0)
    assert [lanes.admit(25.0) for _ in range(7)] and lanes.committed == pytest.approx(175.0)
    # A lone stream is always admitted, even beyond the capacity.
    lone = Admission(cost=cost, budget=0.2, max_batch=16)
    assert lone.admit(500.0) == 500.0


@pytest.mark.parametrize("value", [-1.0, 0.5, 121.0, float("nan"), float("inf")])
def test_expected_fps_outside_its_range_is_invalid(value: float) -> None:
    with pytest.raises(ServiceError) as error:
        expected_fps(value)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_expected_fps_zero_means_the_default() -> None:
    assert expected_fps(0.0) == 25.0 and expected_fps(30.0) == 30.0
