"""KV-cache bookkeeping: block pool, block tables, export/import of blocks, and the
content names of the prefix cache (pure Python).

No tensors live here; ``tandem.runner`` owns the K/V tensors that the block ids index and
``kvtransfer`` moves their bytes. See ``manager`` for the export/import protocol.
"""

from __future__ import annotations

from tandem.kvcache.block_pool import BlockPool, KVStateError, NoFreeBlocksError
from tandem.kvcache.manager import KVAudit, KVCacheManager, KVExport
from tandem.kvcache.prefix import BlockHash, BlockHasher, PrefixCacheStats

__all__ = [
    "BlockHash",
    "BlockHasher",
    "BlockPool",
    "KVAudit",
    "KVCacheManager",
    "KVExport",
    "KVStateError",
    "NoFreeBlocksError",
    "PrefixCacheStats",
]
