"""Small file helpers: writes that are never seen half-done, gluetune's cache folder, installed versions."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, content: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the final file is an ordinary one
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CACHE_DIR_ENV = "GLUETUNE_CACHE_DIR"  # default ~/.cache/gluetune


def cache_dir(kind: str) -> Path:
    """gluetune's cache for one kind of thing ("tokenized", "gguf"): $GLUETUNE_CACHE_DIR/<kind>."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "gluetune").expanduser() / kind


def is_local_path(name: str) -> bool:
    """Whether a model name is a local path rather than a hub id (`org/name`) or a `pkg:` name."""
    return name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name)) or name.count("/") > 1


def installed_version(package: str) -> str | None:
    """The installed version of a distribution (`bitsandbytes`, `gguf`, ...), None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
