"""Where edgetune finds shared data and keeps its caches.

- Shared data (real weights and datasets for tests and examples): `$EDGETUNE_DATA`, else
  `../shared/data` beside the current directory or beside the source checkout.
- Cache (converted models): `$EDGETUNE_CACHE`, else `~/.cache/edgetune`.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgetune.errors import DataError

_CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """Return the shared data folder, or None when it is not present.

    Returns:
        The first existing folder among `$EDGETUNE_DATA`, `./../shared/data` and
        `<checkout>/../shared/data`.
    """
    for candidate in shared_data_candidates():
        if candidate.is_dir():
            return candidate
    return None


def shared_data_candidates() -> list[Path]:
    """The folders searched for shared data, in order (for error messages)."""
    out = []
    if os.environ.get("EDGETUNE_DATA"):
        out.append(Path(os.environ["EDGETUNE_DATA"]).expanduser())
    out.append(Path.cwd().parent / "shared" / "data")
    out.append(_CHECKOUT_ROOT.parent / "shared" / "data")
    return out


def shared_file(relative: str, what: str, otherwise: str) -> Path:
    """The file at `relative` in the first shared data folder that holds it.

    Raises:
        DataError: none holds it; names `what`, every path tried and the fix
            (`otherwise`: the alternative to the shared folder, e.g. a local file).
    """
    for root in shared_data_candidates():
        if (root / relative).is_file():
            return root / relative
    tried = ", ".join(str(root / relative) for root in shared_data_candidates())
    raise DataError(
        f"{what} not found (looked for {tried}); set EDGETUNE_DATA to the shared data "
        f"folder that holds datasets/ (see its README.md), or {otherwise}"
    )


def cache_dir() -> Path:
    """The cache folder (created on demand by callers)."""
    env = os.environ.get("EDGETUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgetune"
