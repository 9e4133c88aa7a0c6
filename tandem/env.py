"""The one place where Tandem reads environment variables.

Every other module asks this one, so the full list of knobs a deployment can turn
from the environment is visible here and nowhere else.

- ``TANDEM_CACHE_DIR``: where generated artefacts (the bundled tiny model) live.
  Default: ``$XDG_CACHE_HOME/tandem`` or ``~/.cache/tandem``.
- ``TANDEM_LOG_LEVEL``: logging level name for services and the CLI. Default ``INFO``.
- ``TANDEM_TRITON``: ``0`` turns the Triton kernels off on CUDA (the torch reference
  attention and ops run instead); default on.
- ``TANDEM_CUDA_GRAPHS``: ``0`` turns CUDA-graph decode off; default on (CUDA only).
- ``TANDEM_MIGRATION_FAULTS``: ``1`` lets ``POST /admin/migrate`` carry a ``fault``
  (``source:first|middle|final``, ``dest:first|middle|final|commit``) that makes that
  migration abort at that point. Test only; off by default, and then a ``fault`` gets a 400.
  Read by the router and by the decode workers (``tandem serve`` passes it to both).
- ``TANDEM_API_KEY`` (comma-separated: several keys), ``TANDEM_ADMIN_KEY``,
  ``TANDEM_METRICS_KEY``: the router's HTTP keys, added to ``--api-key`` / used when
  ``--admin-key`` / ``--metrics-key`` is not given (``router.auth``). The environment keeps
  keys out of ``ps``; they are never logged.
- ``TANDEM_CLUSTER_SECRET``: the secret router and workers prove to each other on every
  control connection (``tandem.auth``), unless ``--cluster-secret-file`` is given.
- Container settings (``tandem.container``, the Docker images' entrypoint; each becomes a
  flag of the service, and a flag given on the command line wins): ``TANDEM_MODEL``
  (--model), ``TANDEM_REGISTRY`` (--registry), ``TANDEM_HOST`` (--host), ``TANDEM_PORT``
  (--port), ``TANDEM_DEVICE`` (--device), ``TANDEM_DTYPE`` (--dtype),
  ``TANDEM_ADVERTISE_HOST`` (--advertise-host), ``TANDEM_WORKER_ID`` (--worker-id);
  ``TANDEM_ARGS`` (more flags, split like a shell); ``TANDEM_HEALTH_MIN_WORKERS`` (the
  router's healthcheck wants at least this many workers, default 1); ``TANDEM_STATE_FILE``
  (where the entrypoint leaves the argv for the healthcheck).
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


def triton_enabled() -> bool:
    """``TANDEM_TRITON`` is not ``0``."""
    return os.environ.get("TANDEM_TRITON", "1") != "0"


def cuda_graphs_enabled() -> bool:
    """``TANDEM_CUDA_GRAPHS`` is not ``0``."""
    return os.environ.get("TANDEM_CUDA_GRAPHS", "1") != "0"


def container_settings() -> dict[str, str]:
    """Every ``TANDEM_*`` variable, for the container entrypoint and healthcheck."""
    return {k: v for k, v in os.environ.items() if k.startswith("TANDEM_")}


def migration_faults_enabled() -> bool:
    """Whether injected migration faults are allowed (tests only)."""
    return os.environ.get("TANDEM_MIGRATION_FAULTS", "") == "1"


def api_keys() -> tuple[str, ...]:
    """``TANDEM_API_KEY`` split at commas, blanks dropped (unset or empty: none)."""
    raw = os.environ.get("TANDEM_API_KEY", "")
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def admin_key() -> str | None:
    """``TANDEM_ADMIN_KEY``, None when unset or empty."""
    return os.environ.get("TANDEM_ADMIN_KEY", "").strip() or None


def metrics_key() -> str | None:
    """``TANDEM_METRICS_KEY``, None when unset or empty."""
    return os.environ.get("TANDEM_METRICS_KEY", "").strip() or None


def cluster_secret() -> str | None:
    """``TANDEM_CLUSTER_SECRET``, None when unset or empty."""
    return os.environ.get("TANDEM_CLUSTER_SECRET", "").strip() or None
