"""The `glidefs` command."""

from glide.cli.main import main

__all__ = ["main"]
