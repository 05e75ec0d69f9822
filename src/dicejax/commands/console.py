"""The terminal consoles of the ``dicejax`` command (``rich``; nothing heavier)."""

from __future__ import annotations

import sys

from rich.console import Console

# Piped output (files, CI logs) gets 140 columns so that the wide tables stay readable.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
