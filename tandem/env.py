"""The one place where Tandem reads environment variables.

Every other module asks this one, so the full list of knobs a deployment can turn
from the environment is visible here and nowhere else.

- ``TANDEM_CACHE_DIR``: where generated artefacts (the bundled tiny model) live.
  Default: ``$XDG_CACHE_HOME/tandem`` or ``~/.cache/tandem``.
- ``TANDEM_LOG_LEVEL``: logging level name for services and the CLI. Default ``INFO``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Directory for Tandem's generated files; created on first use."""
    explicit = os.environ.get("TANDEM_CACHE_DIR")
    if explicit:
        path = Path(explicit)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "tandem"
    path.mkdir(parents=True, exist_ok=True)
    return path


def log_level() -> str:
    """Logging level name, upper case."""
    return os.environ.get("TANDEM_LOG_LEVEL", "INFO").upper()
