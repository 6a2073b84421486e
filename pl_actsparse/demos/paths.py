"""Where the demo data lives (``stories260K.bin``, ``tok512.bin``, the TinyStories and Shakespeare texts).

Nothing is downloaded: the files sit in a folder beside the checkout (``../shared/data``), or wherever
``$PL_ACTSPARSE_DATA`` points.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DATA_ENV_VAR", "resolve_data_dir"]

DATA_ENV_VAR = "PL_ACTSPARSE_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding the pl_actsparse package


def resolve_data_dir(path: str | os.PathLike | None = None) -> Path:
    """Locate the data directory so tests, scripts and notebooks agree without configuration.

    Order: ``path`` if given; else ``$PL_ACTSPARSE_DATA`` if set; else
    ``../shared/data`` from the current directory; else ``../shared/data`` next to
    the repository root. An explicit ``path`` or environment variable that does not
    exist is an error (it is never silently replaced by a default).
    """
    if path is not None:
        candidates = [(Path(path), "explicit path")]
    elif os.environ.get(DATA_ENV_VAR):
        candidates = [(Path(os.environ[DATA_ENV_VAR]), f"${DATA_ENV_VAR}")]
    else:
        candidates = [
            (Path.cwd() / ".." / "shared" / "data", "relative to the current directory"),
            (_REPO_ROOT / ".." / "shared" / "data", "relative to the repository root"),
        ]
    for candidate, _ in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    looked = "; ".join(f"{c} ({why})" for c, why in candidates)
    raise FileNotFoundError(
        f"pl_actsparse data directory not found; looked at: {looked}. "
        f"Pass a path or set {DATA_ENV_VAR} to the folder holding stories260K.bin and tok512.bin."
    )
