"""Where a rollout store lives: a local path, or an fsspec URL (``memory://``, ``s3://``, ``gs://``, ...).

``file://`` URLs are local paths: they are opened with zarr's local store, which writes every file to a
temporary name and renames it into place (fsspec's local filesystem writes in place, so a crash could leave
a half-written metadata file). Every other protocol goes through ``zarr.storage.FsspecStore``, which writes
each key with one whole-object PUT: on object storage (S3, GCS, Azure) a reader sees the old object or the
new one, never a partial one, which is all the store's commit protocol needs (see ``store.py``).

``memory://`` is private to a process: DataLoader workers started with ``spawn`` see an empty filesystem
and those started with ``fork`` a snapshot taken at the fork; stream from ``file://`` or object storage.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["exists", "filesystem", "fsspec_store", "is_url", "location"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_PROTOCOLS = ("file", "local")


def is_url(location) -> bool:
    """True for a string with a URL scheme (``memory://...``, ``s3://...``, ``file://...``)."""
    return isinstance(location, str) and _SCHEME.match(location) is not None


def location(where: str | os.PathLike) -> Path | str:
    """A local ``Path`` for a path or a ``file://`` URL; otherwise the URL itself, without a trailing slash."""
    if not is_url(where):
        return Path(where)
    protocol = _SCHEME.match(where)[1].lower()
    if protocol in _LOCAL_PROTOCOLS:
        return Path(where[len(protocol) + 3:])
    return where.rstrip("/")


def _explain(url: str, err: Exception) -> ValueError:
    protocol = _SCHEME.match(url)[1] if is_url(url) else "?"
    if isinstance(err, ImportError):
        return ValueError(f"cannot open the rollout store {url!r}: fsspec needs an extra package for the "
                          f"{protocol!r} protocol ({err})")
    return ValueError(f"cannot open the rollout store {url!r}: fsspec does not know the {protocol!r} protocol ({err})")


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) of ``url``; ValueError naming the URL (and the missing package)
    for an unknown protocol or one whose filesystem is not installed."""
    import fsspec

    try:
        return fsspec.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise _explain(url, err) from None


def fsspec_store(url: str, storage_options: dict | None = None, read_only: bool = False):
    """``zarr.storage.FsspecStore`` rooted at ``url``."""
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)
    except (ImportError, ValueError) as err:
        raise _explain(url, err) from None


def exists(where: str | os.PathLike, storage_options: dict | None = None) -> bool:
    """True when anything (a store, a file, a non-empty prefix) is at ``where``, a path or a URL."""
    where = location(where)
    if isinstance(where, Path):
        return where.exists()
    fs, path = filesystem(where, storage_options)
    return bool(fs.exists(path))
