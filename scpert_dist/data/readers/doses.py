"""Dose and time parsing for LINCS metadata (GSE92742/GSE70138 strings and CMap 2020 beta numeric + unit).

`parse_dose_um('500 nM') == 0.5`; `parse_dose_um(10, 'uM') == 10.0`; LINCS' missing value '-666' -> NaN.
`parse_time_h('24 h') == 24.0`; `parse_time_h(30, 'm') == 0.5`.
Unknown units raise MetadataError naming the value.
"""

from __future__ import annotations

import math
import re

from ...errors import MetadataError

# factor to micromolar
_DOSE_UNITS = {
    "pm": 1e-6,
    "nm": 1e-3,
    "um": 1.0,
    "µm": 1.0,  # micro sign U+00B5
    "μm": 1.0,  # greek mu U+03BC
    "micromolar": 1.0,
    "mm": 1e3,
    "m": 1e6,
}
# factor to hours
_TIME_UNITS = {"s": 1 / 3600, "sec": 1 / 3600, "m": 1 / 60, "min": 1 / 60, "h": 1.0, "hr": 1.0, "hrs": 1.0,
               "hour": 1.0, "hours": 1.0, "d": 24.0, "day": 24.0, "days": 24.0}
_MISSING = {"", "-666", "-666.0", "na", "nan", "none", "-"}
_NUM_UNIT = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\d\s].*?)?\s*$")


def _is_missing(value) -> bool:
    """None/NaN/-666/'' are missing; so are LINCS combined values like '6 h & 4 h' (cells pre-treated, e.g. NEU.KCL),
    which have no single dose/time."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str) and "&" in value:
        return True
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, (int, float)) and value == -666:
        return True
    return isinstance(value, str) and value.strip().lower() in _MISSING


def _split(value, unit, kind: str) -> tuple[float, str | None]:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("latin-1")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), (None if unit is None else str(unit))
    m = _NUM_UNIT.match(str(value))
    if not m:
        raise MetadataError(f"cannot parse {kind} {value!r}", field=kind,
                            hint="expected a number with a unit, e.g. '10 uM' / '500 nM' / '24 h', or -666 for missing")
    num = float(m.group(1))
    text_unit = m.group(2)
    if text_unit and unit is not None and str(unit).strip().lower() != text_unit.strip().lower():
        raise MetadataError(f"{kind} {value!r} carries unit {text_unit!r} but the unit column says {unit!r}",
                            field=kind, hint="fix the metadata so value and unit agree")
    return num, (text_unit if text_unit else (None if unit is None else str(unit)))


def _parse_quantity(value, unit, kind: str, factor_of) -> float:
    """Shared by dose and time: missing or -666 -> NaN; a number without a unit is taken as the target unit;
    `factor_of(unit)` -> the factor to the target unit, or None for a unit that cannot be converted."""
    if _is_missing(value):
        return float("nan")
    num, u = _split(value, unit, kind)
    if num == -666:
        return float("nan")
    if u is None:
        return num
    factor = factor_of(u)
    if factor is None:
        hint = ("use one of pM, nM, uM (µM), mM, M; non-molar doses (e.g. '%', 'ug/ml') cannot be converted to uM"
                if kind == "dose" else "use one of s, m/min, h, d")
        raise MetadataError(f"unknown {kind} unit {u!r} in {kind} value {value!r}", field=f"{kind} unit", hint=hint)
    return num * factor


def _dose_factor(u: str) -> float | None:
    key = u.strip().replace(" ", "")
    # 'M' is molar; a lower-case 'm' alone is ambiguous and refused
    return _DOSE_UNITS["m"] if key == "M" else (None if key == "m" else _DOSE_UNITS.get(key.lower()))


def parse_dose_um(value, unit: str | None = None) -> float:
    """Dose in micromolar. `value` is a LINCS string ('10 uM', '500 nM', '10 µM', '-666') or a number with `unit`
    (beta: pert_dose + pert_dose_unit). A number without a unit is taken as uM. Missing -> NaN."""
    return _parse_quantity(value, unit, "dose", _dose_factor)


def parse_time_h(value, unit: str | None = None) -> float:
    """Time in hours: '6 h', '24h', '30 m', '2 d', or a number with `unit` (beta pert_time + pert_time_unit).
    A number without a unit is taken as hours. Missing -> NaN."""
    return _parse_quantity(value, unit, "time", lambda u: _TIME_UNITS.get(u.strip().lower()))


def format_dose_um(dose_um: float, unit: str = "uM") -> str:
    """Inverse of parse_dose_um for round trips: '10 uM', '500 nM'."""
    factor = {"pM": 1e-6, "nM": 1e-3, "uM": 1.0, "µM": 1.0, "mM": 1e3, "M": 1e6}[unit]
    return f"{dose_um / factor!r} {unit}"
