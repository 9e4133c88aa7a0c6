"""Logging for the ``tandem`` services: one stderr format, and the router's optional access log.

``configure()`` sets the level from ``TANDEM_LOG_LEVEL`` (``tandem.env``) once per process.
The access log is off by default; ``--access-log`` writes one line per HTTP request to
stdout, ``--access-log FILE`` appends them to FILE. It has its own logger that does not
propagate, so ``TANDEM_LOG_LEVEL=WARNING`` does not silence a log the operator asked for
and the access lines never land on stderr twice.
"""

from __future__ import annotations

import logging
import sys

from tandem import env

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# aiohttp's access-log format: client, request line, status, bytes, seconds, user agent.
ACCESS_FORMAT = '%a "%r" %s %b %Tfs "%{User-Agent}i"'
STDOUT = "-"


def configure() -> None:
    """Log records at ``TANDEM_LOG_LEVEL`` and above to stderr (idempotent)."""
    level = env.log_level()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(
            f"TANDEM_LOG_LEVEL must be a logging level name (DEBUG, INFO, WARNING, ERROR), "
            f"got {level!r}"
        )
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr)
    # Third-party chatter stays at WARNING whatever our level is.
    for name in ("asyncio", "aiohttp", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(max(logging.getLevelName(level), logging.WARNING))


def access_logger(target: str | None) -> logging.Logger | None:
    """The logger to hand aiohttp for ``--access-log [FILE]`` (``None``: no access log)."""
    if target is None:
        return None
    logger = logging.getLogger("tandem.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
    if target == STDOUT:
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.FileHandler(target, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return logger
