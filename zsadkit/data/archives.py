"""Raw archives: sha256 checksums, safe extraction of tar and zip files, resumable downloads.

Extraction refuses any member that would land outside the target folder: absolute paths, `..`
components that escape, symbolic or hard links whose target is outside, and device or FIFO entries.
The whole archive is checked before a single file is written.

Example:
    >>> verify_sha256("btad.zip", "461c9387...")  # doctest: +SKIP
    >>> safe_extract("btad.zip", "data/btad/.staging")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from zsadkit.data.errors import DataError

__all__ = [
    "ARCHIVE_SUFFIXES",
    "ChecksumError",
    "download",
    "safe_extract",
    "sha256_of",
    "UnsafeArchiveError",
    "verify_sha256",
]

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".zip")
_CHUNK = 1 << 20


class ChecksumError(DataError):
    """An archive's sha256 differs from the published one."""


class UnsafeArchiveError(DataError):
    """An archive member would be written outside the extraction folder."""


def sha256_of(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> str:
    """Check a file against its published sha256.

    Returns:
        The digest (equal to `expected`).

    Raises:
        ChecksumError: the digests differ; the message prints both.
    """
    found = sha256_of(path)
    if found != expected.lower():
        raise ChecksumError(
            f"{path}: sha256 mismatch\n  expected {expected.lower()}\n  found    {found}\n"
            "the archive is incomplete, corrupt or a different release; download it again"
        )
    return found


def _member_target(target: Path, name: str, archive: Path) -> Path:
    """The extraction path of member `name`; raises if it is absolute or escapes `target`."""
    if name.startswith(("/", "\\")) or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    destination = (target / name).resolve()
    if destination != target and target not in destination.parents:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside {target} ('..' path); refusing to extract"
        )
    return destination


def _check_tar_member(member: tarfile.TarInfo, target: Path, archive: Path) -> None:
    destination = _member_target(target, member.name, archive)
    if member.issym():
        link = (destination.parent / member.linkname).resolve()
        if posixpath.isabs(member.linkname) or (link != target and target not in link.parents):
            raise UnsafeArchiveError(
                f"{archive}: symbolic link {member.name!r} -> {member.linkname!r} points "
                f"outside {target}; refusing to extract"
            )
    elif member.islnk():
        link = (target / member.linkname).resolve()
        if posixpath.isabs(member.linkname) or (link != target and target not in link.parents):
            raise UnsafeArchiveError(
                f"{archive}: hard link {member.name!r} -> {member.linkname!r} points "
                f"outside {target}; refusing to extract"
            )
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(
            f"{archive}: member {member.name!r} is a device or FIFO; refusing to extract"
        )


def safe_extract(archive: str | Path, target: str | Path) -> Path:
    """Extract a tar (any compression) or zip archive into `target` after checking every member.

    Raises:
        UnsafeArchiveError: a member is absolute, escapes `target`, or is a link pointing outside it;
            nothing is extracted then.
        DataError: the file is not a tar or zip archive.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                _member_target(target, info.filename, archive)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise UnsafeArchiveError(
                        f"{archive}: member {info.filename!r} is a symbolic link; "
                        "refusing to extract links from zip archives"
                    )
            bundle.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            members = bundle.getmembers()
            for member in members:
                _check_tar_member(member, target, archive)
            bundle.extractall(target, members=members, filter="data")
    else:
        raise DataError(f"{archive}: not a tar or zip archive (expected one of {ARCHIVE_SUFFIXES})")
    return target


def download(url: str, destination: str | Path, sha256: str | None = None) -> Path:
    """Download `url` to `destination` with a progress bar, resuming a partial `<destination>.part`.

    The file is renamed into place only once complete and, when `sha256` is given, verified.

    Raises:
        ChecksumError: the downloaded file does not match `sha256` (the partial file is removed).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    done = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request) as response:  # noqa: S310 (URLs come from the manifests)
        if done and response.status != 206:  # the server ignored the Range header: start again
            done = 0
        length = response.headers.get("Content-Length")
        total = done + int(length) if length is not None else None
        with (
            partial.open("ab" if done else "wb") as handle,
            tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=destination.name) as progress,
        ):
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                handle.write(chunk)
                progress.update(len(chunk))
    if sha256 is not None:
        try:
            verify_sha256(partial, sha256)
        except ChecksumError:
            partial.unlink()
            raise
    os.replace(partial, destination)
    return destination
