"""Settings of the machine a run uses, decided in one place."""
from __future__ import annotations

import os


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))
