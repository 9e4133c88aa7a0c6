"""Live migration of running requests between decode workers (Llumnix), pure parts.

``plan``: how a migration is cut into stages, the transfer id of each stage, fault
injection points. ``inbox``: the destination's bookkeeping of migrations arriving in
stages (their growing reservation and its expiry). The services drive them:
``decode_worker/migration_out.py`` (source) and ``decode_worker/migration_in.py``
(destination); the router decides what moves where (``router/migration.py``).
"""

from __future__ import annotations

from tandem.migration.inbox import InboundMigration, MigrationInbox
from tandem.migration.plan import (
    FAULT_POINTS,
    Fault,
    Stage,
    StagePolicy,
    TransferId,
    plan_stage,
)

__all__ = [
    "FAULT_POINTS",
    "Fault",
    "InboundMigration",
    "MigrationInbox",
    "Stage",
    "StagePolicy",
    "TransferId",
    "plan_stage",
]
