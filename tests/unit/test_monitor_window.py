"""The monitor's window: UTC without a zone (as the log stamps rows); offsets converted, bad values named."""

from __future__ import annotations

from datetime import datetime

import pytest

from adps.errors import AdpsError
from flows.monitor import window_bounds


def test_an_offset_is_converted_to_utc_and_no_offset_means_utc():
    assert window_bounds("2026-12-01T13:15:00+02:00", 2) == (
        datetime(2026, 12, 1, 9, 15),
        datetime(2026, 12, 1, 11, 15),
    )
    assert window_bounds("2026-12-01T11:15:00", 0.5) == (datetime(2026, 12, 1, 10, 45), datetime(2026, 12, 1, 11, 15))


@pytest.mark.parametrize(("until", "hours", "message"), [("yesterday", 1, "not an ISO time"), (None, -1, "positive")])
def test_bad_windows_are_named(until, hours, message):
    with pytest.raises(AdpsError, match=message):
        window_bounds(until, hours)
