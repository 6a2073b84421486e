"""Where the demo data lives (``stories260K.bin``, ``tok512.bin``, the TinyStories and Shakespeare texts).

Nothing is downloaded: the files sit in ``$PL_ACTSPARSE_DATA``, or by default in ``../shared/data`` beside the
repository the command runs in (the repository holding the current directory; ``make main`` runs from the
checkout's root). The installed package's location plays no part.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV_VAR", "resolve_data_dir", "repository_root"]

DATA_ENV_VAR = "PL_ACTSPARSE_DATA"


def repository_root(start: str | os.PathLike | None = None) -> Path:
    """The repository holding ``start`` (default: the current directory): the nearest folder, ``start``
    included, with a ``.git`` or a ``pyproject.toml``; ``start`` itself when no folder above has one."""
    here = Path.cwd() if start is None else Path(start)
    for folder in (here, *here.parents):
        if (folder / ".git").exists() or (folder / "pyproject.toml").is_file():
            return folder
    return here


def resolve_data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path`` if given; else ``$PL_ACTSPARSE_DATA`` if set; else ``../shared/data``
    from the current directory's :func:`repository_root`.

    Raises:
        FileNotFoundError: the chosen folder does not exist (an explicit ``path`` or environment variable
            is never silently replaced by the default); the message names it and how it was chosen.
    """
    if path is not None:
        candidate, why = Path(path), "explicit path"
    elif os.environ.get(DATA_ENV_VAR):
        candidate, why = Path(os.environ[DATA_ENV_VAR]), f"${DATA_ENV_VAR}"
    else:
        candidate, why = repository_root() / ".." / "shared" / "data", "../shared/data from the repository of the current directory"
    if candidate.is_dir():
        return candidate.resolve()
    raise FileNotFoundError(
        f"pl_actsparse data directory not found: {candidate} ({why}). "
        f"Pass a path or set {DATA_ENV_VAR} to the folder holding stories260K.bin and tok512.bin."
    )
