"""Throughput benchmarks (`scpert bench finetune | pretrain | ingest | gpu`): ratios measured side by side in one run."""

from __future__ import annotations

import os


def load_average() -> str:
    """The 1/5/15-minute load average as 'a / b / c' ('n/a' where the platform has none), printed beside the rates:
    on a busy machine a wall clock measures the other jobs too."""
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
