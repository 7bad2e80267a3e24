"""Dose/time parsing: LINCS strings, beta numeric + unit, missing values, unknown units (property tests)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scpert_dist.data.readers.doses import format_dose_um, parse_dose_um, parse_time_h
from scpert_dist.errors import MetadataError

pos = st.floats(min_value=1e-4, max_value=1e5, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("value,unit,expected", [
    ("10 uM", None, 10.0), ("500 nM", None, 0.5), ("10 µM", None, 10.0), ("10 μM", None, 10.0),
    (b"10 \xb5M", None, 10.0),  # latin-1 bytes as stored in the real cmapR GCTX
    ("1.11 uM", None, 1.11), ("10uM", None, 10.0), (10, "uM", 10.0), (500.0, "nM", 0.5), ("2", "mM", 2000.0),
    (3, None, 3.0),
])
def test_known_doses(value, unit, expected):
    assert parse_dose_um(value, unit) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["-666", -666, None, float("nan"), "", "6 h & 4 h"])
def test_missing_is_nan(value):
    assert math.isnan(parse_dose_um(value))
    assert math.isnan(parse_time_h(value))


@pytest.mark.parametrize("value,unit", [("0.1 %", None), ("10 ug/ml", None), (10, "ug/ml"), ("5 m", None),
                                        ("10 uM", "nM")])
def test_unknown_or_conflicting_units_raise(value, unit):
    with pytest.raises(MetadataError) as e:
        parse_dose_um(value, unit)
    assert str(value) in str(e.value) or str(unit) in str(e.value)


@given(pos)
def test_nm_is_thousandth_of_um(x):
    assert parse_dose_um(f"{x!r} nM") == pytest.approx(parse_dose_um(f"{x!r} uM") / 1000, rel=1e-12)
    assert parse_dose_um(x, "nM") == pytest.approx(x / 1000, rel=1e-12)


@given(pos, st.sampled_from(["pM", "nM", "uM", "µM", "mM", "M"]))
def test_format_parse_round_trip(x, unit):
    assert parse_dose_um(format_dose_um(x, unit)) == pytest.approx(x, rel=1e-9)


@given(pos)
def test_string_and_numeric_forms_agree(x):
    assert parse_dose_um(f"{x!r} uM") == parse_dose_um(x, "uM")
    assert parse_time_h(f"{x!r} h") == parse_time_h(x, "h")


@given(st.floats(min_value=0.01, max_value=1000, allow_nan=False))
def test_time_units_scale(x):
    assert parse_time_h(x, "d") == pytest.approx(24 * x)
    assert parse_time_h(f"{x!r} m") == pytest.approx(x / 60)
    assert parse_time_h(f"{x!r} h") == pytest.approx(x)


def test_unknown_time_unit():
    with pytest.raises(MetadataError, match="weeks"):
        parse_time_h("2 weeks")
