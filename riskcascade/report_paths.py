"""How reports name paths: relative to the repository when inside it, so a committed report names no machine's
folder layout (the band sweep's results, the distillation report)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def shown_path(path: Path | str | None) -> str:
    """``path`` as a report shows it: relative to the repository when inside it, else as it is; "" for None."""
    if path is None:
        return ""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
