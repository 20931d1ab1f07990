"""Files that appear whole or not at all.

Pruning state, cached corpora and reports are each written to a temporary file beside their
final name, then moved over it with one ``os.replace``: a crash, a full disk or an
interrupt mid-write leaves the previous file (or none), never half of a new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)``, then move that file over ``target``; on any failure remove it and
    re-raise.

    The temporary file has a unique name in ``target``'s folder (same file system, so the
    move is atomic), and concurrent writers never share one.
    """
    target = Path(target)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
