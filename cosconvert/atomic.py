"""Files that are whole or absent.

Every file cosconvert writes goes first to a temporary beside it, in the same folder so that the
rename is atomic, and is renamed onto its name only once complete. A process killed mid-write (no
handler catches SIGKILL) leaves nothing but that temporary, ``.NAME.XXXXXXXX.partial``, which
:func:`remove_partial` deletes.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

SUFFIX = ".partial"
_RANDOM = "?" * 8  # tempfile's unique part


def _temporary_name(path: Path) -> dict:
    return {"prefix": f".{path.name}.", "suffix": SUFFIX, "dir": path.parent}


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary path beside ``path`` to write to; when the block ends it is renamed
    onto ``path``, or deleted if the block raised. Writers that choose a format from the suffix must
    be told it (``fig.savefig(tmp, format="png")``)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(**_temporary_name(path))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make it private where other files are not
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` for a write of several files (a model and its external
    data), which the caller renames into place; removed with whatever is left when the block ends."""
    tmp = Path(tempfile.mkdtemp(**_temporary_name(Path(path))))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_partial(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that unfinished :func:`atomic_write` calls for the files ``names``
    left in ``folder``; returns them."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{glob.escape(name)}.{_RANDOM}{SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
