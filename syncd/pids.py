"""Whether a process of this host still runs (stdlib only)."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True while ``pid`` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
