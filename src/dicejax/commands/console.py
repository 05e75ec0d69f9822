"""The terminal consoles of the ``dicejax`` command (``rich``; nothing heavier)."""

from __future__ import annotations

import sys

from rich.console import Console

# Piped output (files, CI logs) gets 140 columns so that the wide tables stay readable.
# No markup: tables and messages print brackets as they are (``W[k, j]``, ``[n, n]``).
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140, markup=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
