"""Object stores: where every volume's packs and manifests live durably.

`ObjectStore` (base.py) is the one interface; `LocalDirStore` (local.py, the
embedded default) and `S3Store` (s3.py, boto3; imported lazily so the local
store works without boto3) implement it with the same semantics. `FaultyStore`
(faults.py) wraps any store to inject failures in tests.
"""

from glide.store.base import (
    InvalidKey,
    NotFound,
    ObjectInfo,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    StoreUnsafe,
)
from glide.store.local import LocalDirStore

__all__ = [
    "InvalidKey",
    "LocalDirStore",
    "NotFound",
    "ObjectInfo",
    "ObjectStore",
    "PreconditionFailed",
    "StoreError",
    "StoreUnavailable",
    "StoreUnsafe",
]
