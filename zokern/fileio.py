"""Files that are either the old or the new version after a crash: the one write path for run files and logs."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a synced temporary file and a rename: a kill or power loss at any point
    leaves the old file or the new one, never a part."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
