"""Integration-tier setup: make tests/tools importable.

The helpers in tests/tools are plain modules (some also run as scripts under
Debian's python3 for libnbd), so they are put on sys.path rather than packaged.
"""

from __future__ import annotations

import sys
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))
