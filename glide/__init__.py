"""glidefs: a userspace block-device cache (NBD export, local WAL, object-store durability)."""

__version__ = "0.1.0"
