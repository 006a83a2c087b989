"""Model versions: each trained model in its own folder, published whole, and a pointer to the one that serves.

``model.dir`` is the registry's root::

    model.dir/
      versions/<version>/   model.json (the card), model.onnx, model.lgb.txt, features.json, ...
      live.json             {"version": ..., "history": [{"version", "at", "reason"}, ...]}

Publishing writes a version into a staging folder beside ``versions/`` and renames it into place (one rename on
one file system), so a reader sees a version whole or not at all, and never a live version being overwritten.
The pointer is replaced atomically too (write, fsync, rename). Switching a running platform goes through the
orchestrator (``ModelService.UseModel``), which loads the version on every scorer replica before it moves the
pointer; ``set_live`` alone changes what the next start serves.

A folder with a model card at its root and no pointer (a model written by ``write_model`` into a plain folder,
as tests and older set-ups do) is one unnamed version: ``live_dir`` returns the folder itself, and ``adopt_flat``
copies it into the registry as a named version the first time a version is published beside it.

Plain file operations, no Ray or gRPC: the CLI, the scorer replicas and the orchestrator share it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from riskcascade.core.model_card import CARD_FILE, ModelCard, load_model_card

VERSIONS_DIR = "versions"
LIVE_FILE = "live.json"
STAGING_PREFIX = ".staging-"


class UnknownModelVersion(LookupError):
    """The registry holds no version of that name; the message lists those it holds."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: Path
    card: ModelCard
    live: bool


@dataclass(frozen=True)
class Switch:
    """One move of the live pointer, as recorded in its history."""

    version: str
    at: str
    reason: str


class ModelRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS_DIR

    # -- reading -----------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Published versions, oldest first (by the card's creation time, then name)."""
        return [v.version for v in self.versions()]

    def versions(self) -> list[ModelVersion]:
        """Published versions with their cards (each read once), oldest first."""
        if not self.versions_dir.is_dir():
            return []
        live = self.live()
        found = [ModelVersion(p.name, p, load_model_card(p), p.name == live)
                 for p in self.versions_dir.iterdir() if p.is_dir() and (p / CARD_FILE).exists()]
        return sorted(found, key=lambda v: (v.card.created_at, v.version))

    def path(self, version: str) -> Path:
        """The folder of ``version``; UnknownModelVersion when the registry has none."""
        if not version or "/" in version or version.startswith("."):
            raise UnknownModelVersion(f"{version!r} is not a version name")
        path = self.versions_dir / version
        if not (path / CARD_FILE).exists():
            held = ", ".join(self.names()) or "none"
            raise UnknownModelVersion(f"no model version {version!r} in {self.versions_dir} (it holds: {held})")
        return path

    def live(self) -> str | None:
        """The version the pointer names (None without a pointer)."""
        history = self.history()
        return history[-1].version if history else None

    def history(self) -> list[Switch]:
        pointer = self.root / LIVE_FILE
        if not pointer.exists():
            return []
        data = json.loads(pointer.read_text())
        return [Switch(**entry) for entry in data["history"]]

    def previous(self) -> str | None:
        """The version that served before the live one (what a rollback returns to), or None."""
        history = self.history()
        live = history[-1].version if history else None
        for entry in reversed(history[:-1]):
            if entry.version != live and (self.versions_dir / entry.version / CARD_FILE).exists():
                return entry.version
        return None

    def live_dir(self) -> Path:
        """The folder the platform serves: the live version's, or the root itself for a flat (unnamed) model."""
        live = self.live()
        return self.path(live) if live is not None else self.root

    # -- writing -----------------------------------------------------------------------------------------------

    def publish(self, write: Callable[[Path], ModelCard], make_live: bool | None = None) -> ModelCard:
        """Write a version with ``write(folder)`` (which returns its card) into a staging folder, then rename it
        into ``versions/<card.version>``. ``make_live``: move the pointer to it (None: only when nothing is live
        yet, so a first model serves and a later one waits for ``use``)."""
        self.adopt_flat()
        card = self._place(write)
        if make_live or (make_live is None and self.live() is None):
            self.set_live(card.version, "published")
        return card

    def adopt_flat(self) -> str | None:
        """Copy a flat model (card at the root, no pointer) into ``versions/`` and make it live; returns its
        version, or None when there is nothing to adopt. The root's files stay (a platform may be serving them)."""
        if self.live() is not None or not (self.root / CARD_FILE).exists():
            return None
        card = load_model_card(self.root)
        if not (self.versions_dir / card.version).exists():
            self._place(self._copy_flat)
        self.set_live(card.version, "adopted from the flat layout")
        return card.version

    def _copy_flat(self, staging: Path) -> ModelCard:
        for item in self.root.iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, staging / item.name)
        return load_model_card(staging)

    def _place(self, write: Callable[[Path], ModelCard]) -> ModelCard:
        """Fill a staging folder beside ``versions/`` with ``write`` (which returns the card), make it durable and
        rename it into ``versions/<card.version>``: whole or not at all, nothing left behind on failure."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            card = write(staging)
            target = self.versions_dir / card.version
            if target.exists():
                raise FileExistsError(f"model version {card.version} is already published at {target}")
            _fsync_tree(staging)
            os.rename(staging, target)
            _fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return card

    def set_live(self, version: str, reason: str) -> Switch:
        """Point at ``version`` (which must be published), recording when and why."""
        self.path(version)
        entry = Switch(version, datetime.now(timezone.utc).isoformat(), reason)
        history = [*self.history(), entry]
        body = json.dumps({"version": version, "history": [vars(s) for s in history]}, indent=1)
        _write_atomically(self.root / LIVE_FILE, body.encode())
        return entry


def live_model_dir(root: Path) -> Path:
    """The folder of the model that serves from ``model.dir`` (see ModelRegistry.live_dir)."""
    return ModelRegistry(root).live_dir()


def _write_atomically(path: Path, body: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for item in folder.iterdir():
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
