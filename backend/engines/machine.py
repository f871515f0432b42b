"""What this machine can run: whether Core ML prediction is available here, and if not, why.

Imported by engine selection (select.py), the Core ML runtime and the doctor alike, and importing nothing of
theirs, so none of them imports another to ask. Call it through the module
(`machine.coreml_unavailable_reason()`), so that a test that patches it here is seen everywhere.
"""
from __future__ import annotations

import platform
import sys
from typing import Optional


def coreml_unavailable_reason() -> Optional[str]:
    """None when Core ML prediction can run here, else the sentence saying why not."""
    if sys.platform != "darwin":
        return f"Core ML prediction needs macOS (this is {platform.system()})"
    if platform.machine() != "arm64":
        return "Core ML's Neural Engine path needs an Apple Silicon Mac"
    try:
        import coremltools  # noqa: F401
    except ImportError:
        return "coremltools is not installed"
    return None
