"""The CLI's other commands (bench, export-coreml, quantize), each registered when its module exists."""
from __future__ import annotations

import importlib

# (module, function) pairs: each module defines add_command(subparsers).
_COMMANDS = ("backend.bench", "backend.engines.coreml.cli", "backend.quantize")


def add_commands(sub) -> None:
    for name in _COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.add_command(sub)
