"""Object stores: where every volume's packs and manifests live durably.

`ObjectStore` (base.py) is the one interface; `LocalDirStore` (local.py, the
embedded default) and `S3Store` (s3.py, boto3; imported lazily so the local
store works without boto3) implement it with the same semantics. `FaultyStore`
(faults.py) wraps any store to inject failures in tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from glide.config import StoreConfig

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
    "from_config",
]


def from_config(cfg: StoreConfig, data_dir: Path) -> ObjectStore:
    """The store a configuration names (local: <data_dir>/store by default)."""
    if cfg.kind == "local":
        return LocalDirStore(cfg.path or data_dir / "store")
    from glide.store.s3 import S3Store

    return S3Store(
        cfg.bucket, cfg.prefix, endpoint_url=cfg.endpoint_url, region=cfg.region,
        addressing_style=cfg.addressing_style,  # type: ignore[arg-type]
        connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
        max_attempts=cfg.max_attempts,
    )
