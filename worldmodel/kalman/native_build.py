"""Where the native loops' library is built, and which library on disk may be loaded (see ``native``).

Trust: a library is built, self-tested and loaded only in a private directory of this user's: created
with mode 0700, and checked before every load to be a directory (not a symbolic link) owned by this
user and writable by no one else, under a parent that others cannot rename it in. The process that
builds and self-tests a library records its sha256 in ``<name>.ok`` next to it, and a library is loaded
only when it is a regular file of this user's, writable by no one else, whose sha256 is the recorded
one: a file of the right name planted by anyone else, or changed since its self-test, is never loaded.

No file a process may have loaded is ever written again: a build is compiled under a unique temporary
name and renamed to a name that contains its own sha256 (``<name>-<sha256[:16]>.so``; one with the same
contents that is already there is kept), and the record is replaced atomically. Each load refreshes the
library's modification time, and other builds' files are deleted only once unused for ``STALE_AFTER_S``
(a file deleted under a process that maps it over NFS is a SIGBUS for that process).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["NotHere", "Rejected", "WRONG_RESULTS", "candidate_dirs", "find_or_build"]

WRONG_RESULTS = 3  # the self-test's exit status when the library runs but its results differ
STALE_AFTER_S = 7 * 24 * 3600  # another build's files are deleted once unused for this long


class NotHere(Exception):
    """This directory cannot hold the library, or the build failed here: another directory may do."""


class Rejected(Exception):
    """The library failed its self-test (wrong results, a crash or a time-out), now or in an earlier
    process (``<name>.failed``): no directory will do."""


def candidate_dirs() -> tuple[list[Path], list[str]]:
    """The directories to build in, in order (``$WORLDMODEL_NATIVE_DIR`` alone where set, else the user
    cache and a per-user temporary directory), and why a usual one is missing."""
    if os.environ.get("WORLDMODEL_NATIVE_DIR"):
        return [Path(os.environ["WORLDMODEL_NATIVE_DIR"])], []
    dirs, missing = [], []
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        dirs.append(Path(xdg) / "ldm-worldmodel")
    else:
        try:
            dirs.append(Path.home() / ".cache" / "ldm-worldmodel")
        except (RuntimeError, KeyError, OSError) as exc:  # HOME unset and no passwd entry (docker --user)
            missing.append(f"no user cache (no XDG_CACHE_HOME, no home directory: {exc})")
    try:
        dirs.append(Path(tempfile.gettempdir()) / f"ldm-worldmodel-{os.getuid()}")
    except OSError as exc:
        missing.append(f"no temporary directory: {exc}")
    return dirs, missing


def _unsafe(path: Path, directory: bool) -> str | None:
    """Why ``path`` is not a directory (``directory``) or regular file of this user's that no one else can
    write; None if it is."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR if directory else stat.S_ISREG)(st.st_mode):
        return f"{path} is not a {'directory' if directory else 'regular file'}" + (
            " but a symbolic link" if stat.S_ISLNK(st.st_mode) else "")
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}; remove it to rebuild)"
    return None


def _private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700 where missing; raise NotHere unless it is private to this user."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    except OSError as exc:
        raise NotHere(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        parent = os.stat(path.parent)
    except OSError as exc:
        raise NotHere(f"{path.parent}: {exc.strerror}") from exc
    if parent.st_uid not in (0, os.geteuid()) or (parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX):
        raise NotHere(f"{path.parent} lets another user replace {path.name} (owner uid {parent.st_uid}, mode "
                      f"{stat.S_IMODE(parent.st_mode):o})")
    error = _unsafe(path, directory=True)
    if error:
        raise NotHere(error)


def _sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _recorded(directory: Path, name: str) -> tuple[Path | None, str | None]:
    """The self-tested library ``name`` in ``directory`` if it may be loaded, else (None, why not; None
    where there is no record). Checked anew before every load."""
    record = directory / f"{name}.ok"
    if not os.path.lexists(record):
        return None, None
    try:
        error = _unsafe(directory, directory=True) or _unsafe(record, directory=False)
        digest = "" if error else record.read_text().strip()
        if not error and not re.fullmatch("[0-9a-f]{64}", digest):
            error = f"{record} holds no sha256"
        path = directory / f"{name}-{digest[:16]}.so"
        error = error or _unsafe(path, directory=False)
        if not error and _sha256(path) != digest:
            error = f"{path} is not the library whose sha256 {record} records"
    except OSError as exc:
        error = f"{record}: {exc}"
    if error:
        return None, error
    for used in (path, record):  # in use: not stale (see _remove_stale)
        with contextlib.suppress(OSError):
            os.utime(used)
    return path, None


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically by a file of this user's holding ``text`` (mode 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale(directory: Path, keep: set[Path]) -> None:
    """Delete other builds' files (other sources, torch versions, abandoned temporary files) unused for
    ``STALE_AFTER_S``; a library another process has loaded recently is kept."""
    now = time.time()
    for path in directory.glob("native_kalman-*"):
        if path not in keep:
            with contextlib.suppress(OSError):
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > STALE_AFTER_S:
                    path.unlink()


def _build(directory: Path, name: str, source: Path, test: list[str], env: dict, timeout: float) -> None:
    """Compile ``source`` under a temporary name, self-test it (``test + [path]`` in a subprocess) and record
    it as ``<name>-<sha256[:16]>.so``. Raises NotHere or Rejected (remembered in ``<name>.failed``)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise NotHere("no C compiler (set CC or install cc)")
    cmd, tmp = [compiler, "-O2", "-shared", "-fPIC", "-o", "OUT", str(source.resolve()), "-lm"], None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{name}-", suffix=".tmp", dir=directory)
        os.close(fd)
        cmd[cmd.index("OUT")] = tmp
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise NotHere(f"{' '.join(cmd)} failed: {proc.stderr.strip()[:500]}")
        os.chmod(tmp, 0o700)  # whatever the umask: writable by no one else
        verdict = None
        try:  # a wrong BLAS interface (say 64-bit integers) would crash or corrupt: check in a process of its own
            check = subprocess.run([*test, tmp], capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            verdict = f"the self-test of the freshly built {name}.so did not finish within {timeout:g} s"
        else:
            tail = " ".join(check.stderr.strip().splitlines()[-4:])
            if check.returncode == WRONG_RESULTS or check.returncode < 0:  # wrong results or a crash
                verdict = f"the freshly built {name}.so failed its self-test: {tail}"
            elif check.returncode:  # an environment problem (say an import error): try again next time
                raise NotHere(f"the self-test of {name}.so could not run (exit status {check.returncode}): {tail}")
        failed = directory / f"{name}.failed"
        if verdict:  # remembered, so later processes do not build and test again
            _write(failed, verdict)
            raise Rejected(f"{verdict} (delete {failed} to try again)")
        digest = _sha256(tmp)
        path = directory / f"{name}-{digest[:16]}.so"
        if _unsafe(path, directory=False) or _sha256(path) != digest:  # else keep the identical file (in use?)
            os.replace(tmp, path)
        _write(directory / f"{name}.ok", digest + "\n")
        _remove_stale(directory, {path, directory / f"{name}.ok", directory / f"{name}.lock"})
    except (OSError, subprocess.SubprocessError) as exc:
        raise NotHere(f"{' '.join(cmd)} failed: {exc}") from exc
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def find_or_build(directory: Path, name: str, source: Path, test: list[str], env: dict, timeout: float) -> Path:
    """The path of the self-tested library ``name`` in ``directory`` (private to this user; created where
    missing), built from ``source`` and recorded first where needed; checked just now, to be loaded at once.
    Raises NotHere (try another directory) or Rejected (the build is wrong: try none)."""
    _private_dir(directory)
    try:
        lock = open(directory / f"{name}.lock", "a")  # one build at a time; the others then load it
    except OSError as exc:
        raise NotHere(f"cannot write in {directory}: {exc.strerror}") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failed = directory / f"{name}.failed"
        if failed.exists():
            raise Rejected(f"{failed.read_text()} (delete {failed} to try again)")
        path, why = _recorded(directory, name)
        if path is None:
            try:
                _build(directory, name, source, test, env, timeout)
            except NotHere as exc:
                raise NotHere(f"{why}; rebuilding: {exc}" if why else str(exc)) from exc
            path, why = _recorded(directory, name)
            if path is None:
                raise NotHere(why or f"no record of {name} after its build")
    return path
