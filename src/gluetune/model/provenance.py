"""What exactly a run's base model was, for its run record: a hub model's commit, a content hash of a
local folder, a `pkg:` package's folder or a GGUF file. A folder read back later loads the recorded
commit of a hub model (results.rundir.pin_recorded_revision), not whatever the hub's branch holds then.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ..config.run import ModelConfig
from ..files import installed_version, is_local_path, sha256_of
from . import sources

logger = logging.getLogger("gluetune")


def model_source(model: ModelConfig) -> dict:
    """{name_or_path, revision (as configured), and `commit` (a hub model: the commit its revision
    resolves to, from the local cache once the model has loaded) or `sha256` (a folder, a `pkg:`
    package's folder, a GGUF file: a digest of its content) and, for a package, its version}."""
    name = model.name_or_path
    found: dict = {"name_or_path": name, "revision": model.revision}
    if model.gguf_file:
        path = sources.gguf_path(model)
        return {**found, "gguf_file": model.gguf_file, "sha256": sha256_of(path), **_package(name)}
    if name.startswith(sources.PACKAGE_SCHEME) or is_local_path(name):
        return {**found, "sha256": folder_digest(Path(sources.resolve_name(name))), **_package(name)}
    return {**found, "commit": hub_commit(name, model.revision)}


def hub_commit(repo: str, revision: str | None, repo_type: str | None = None) -> str | None:
    """The commit `revision` (None: the default branch) of a hub repository resolves to; None where it
    cannot be told (offline with nothing cached)."""
    from transformers.utils.hub import resolve_revision

    resolved = resolve_revision(repo, revision, repo_type=repo_type)
    return getattr(resolved, "resolved", None)


def folder_digest(folder: Path) -> str:
    """sha256 over the folder's files (not hidden ones), each by its relative path and its own sha256."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_of(path)}\n".encode())
    return digest.hexdigest()


def _package(name: str) -> dict:
    if not name.startswith(sources.PACKAGE_SCHEME):
        return {}
    module = name[len(sources.PACKAGE_SCHEME):]
    return {"package_version": installed_version(module.replace("_", "-")) or installed_version(module)}
