"""The semi-synthetic dataset (see core.py): hidden truth (truth.py), single-cell noise (noise.py)."""

from .core import PRESETS, SimPreset, make_truth, simulate

__all__ = ["PRESETS", "SimPreset", "make_truth", "simulate"]
