"""Where results are written: one output policy for every command and the app.

Every output (a merged-adapter directory, a coefficient directory, a comparison folder, a JSON or
Markdown file) goes through :func:`reserve_output`, which, BEFORE any heavy work:

- refuses an output that is an input, lies inside an input directory, or contains an input (the
  run config, the base, an adapter, an encoder, a probe-data file, a task-data directory);
- refuses an existing output unless ``overwrite`` is set, and even then replaces a directory only
  when this tool wrote it (its ``.esm_output.json`` marker lists every file, and the directory holds
  nothing else) and a file only when it is a regular file that is no input;
- takes an exclusive lock on the output path (``.<name>.esm-lock`` beside it), so a second run to
  the same output fails at once with a clear message instead of silently replacing the first;
- cleans the left-overs of an interrupted earlier run to the same output (its temporary folder, or
  a previous output moved aside during a replace, which is put back) and reports what it did.

The result is then written atomically: into a temporary sibling, renamed into place in one step.

    with reserve_output("runs/es", kind="dir", overwrite=False, inputs=spec_inputs(spec)) as out:
        ... heavy work ...
        out.write_dir(lambda tmp: save_everything_into(tmp))

A process killed at any moment leaves either the old output, or the new one, never a mix; what it
leaves beside the output is cleaned (or reported) by the next run to that output.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from esm_core import __version__
from esm_core.errors import ESMError

MARKER = ".esm_output.json"  # written into every output directory: which files this tool wrote
WRITING = ".esm_writing.json"  # inside a temporary folder while it is being written
MARKER_FORMAT = "esm_core.output/1"


@dataclass(frozen=True)
class Input:
    """A path a command reads, with the role it plays (named in refusals)."""

    path: str
    role: str


def _resolve(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


# ------------------------------------------------------------------------------------ checks
def check_output(path: str | os.PathLike, *, kind: str = "dir", overwrite: bool = False,
                 inputs: Iterable[Input] = (), what: str = "--out") -> Path:
    """The checks of :func:`reserve_output` without taking the lock (cheap, no side effects)."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', not {kind!r}")
    if str(path).strip() == "":
        raise ESMError(f"{what} is empty.", fix=f"give {what} a path.")
    out = _resolve(path)
    if out == out.parent:
        raise ESMError(f"{what} {str(out)!r} is the file-system root.", fix=f"choose a new folder for {what}.")
    for inp in inputs:
        if not inp.path:
            continue
        p = _resolve(inp.path)
        if p == out:
            raise ESMError(f"{what} {str(out)!r} is the {inp.role}, an input of this run; inputs are never "
                           "overwritten.", fix=f"choose another {what}.")
        if _inside(out, p):
            raise ESMError(f"{what} {str(out)!r} lies inside the {inp.role} {str(p)!r}, an input of this run.",
                           fix=f"choose a {what} outside the inputs.")
        if _inside(p, out):
            raise ESMError(f"{what} {str(out)!r} contains the {inp.role} {str(p)!r}, an input of this run; "
                           "it is never replaced.", fix=f"choose a new, empty location for {what}.")
    if os.path.lexists(out):
        if not overwrite:
            raise ESMError(f"{what} {str(out)!r} already exists.",
                           fix=f"choose a new {what}, or pass --overwrite to replace it.")
        if kind == "dir":
            if not out.is_dir():
                raise ESMError(f"{what} {str(out)!r} exists and is not a directory.", fix=f"choose another {what}.")
            foreign = foreign_files(out)
            if foreign is None:
                raise ESMError(f"{what} {str(out)!r} is a directory this tool did not write (no {MARKER}); "
                               "--overwrite only replaces outputs of esm_core.",
                               fix=f"choose a new {what}, or move that directory away yourself.")
            if foreign:
                raise ESMError(f"{what} {str(out)!r} holds files this tool did not write "
                               f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); it is not replaced.",
                               fix=f"choose a new {what}, or move those files away yourself.")
        elif not out.is_file():
            raise ESMError(f"{what} {str(out)!r} exists and is not a regular file.", fix=f"choose another {what}.")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ESMError(f"{what} {str(out)!r} cannot be written: {str(parent)!r} is not a writable directory.",
                       fix=f"choose a {what} in a directory you can write to.")
    return out


def read_marker(directory: Path) -> dict | None:
    m = directory / MARKER
    if not m.is_file():
        return None
    try:
        d = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == MARKER_FORMAT else None


def _listing(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() or p.is_symlink())


def foreign_files(directory: Path) -> list[str] | None:
    """Files in an output directory that its marker does not list (None: no marker at all)."""
    marker = read_marker(directory)
    if marker is None:
        return None
    known = set(marker.get("files", [])) | {MARKER}
    return [f for f in _listing(directory) if f not in known]


# ------------------------------------------------------------------------------------ reservation
@dataclass
class Reservation:
    """An output path, checked and locked; write it once with write_dir / write_file."""

    path: Path
    kind: str
    overwrite: bool
    inputs: tuple[Input, ...]
    what: str
    command: str
    notes: list[str] = field(default_factory=list)  # what was cleaned up
    _fd: int | None = None
    _lock_path: Path | None = None
    written: bool = False

    # -------------------------------------------------------------- lock
    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.parent / f".{self.path.name}.esm-lock"
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                self._busy(fd, e)
            try:  # the holder before us may have unlinked the file between our open and our flock
                if os.fstat(fd).st_ino == os.stat(self._lock_path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), command=self.command,
                               started=time.strftime("%Y-%m-%d %H:%M:%S"))).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd

    def _busy(self, fd: int, e: OSError) -> None:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            holder = {}
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ESMError(f"Cannot lock {self.what} {str(self.path)!r}: {e.strerror}.") from None
        who = f" (pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')})" if holder else ""
        raise ESMError(f"Another esm_core run is writing {self.what} {str(self.path)!r}{who}.",
                       fix=f"wait for it to finish, or choose another {self.what}.") from None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._lock_path is not None:
                self._lock_path.unlink(missing_ok=True)  # waiters never block (LOCK_NB), so this is safe
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -------------------------------------------------------------- left-overs
    def _clean_leftovers(self) -> None:
        """With the lock held, whatever an earlier run to this output left beside it is stale."""
        parent, name = self.path.parent, self.path.name
        for p in sorted(parent.glob(f".{name}.esm-old-*")):
            if not self.path.exists() and not os.path.lexists(self.path):
                os.replace(p, self.path)  # a replace was interrupted: the previous output comes back
                self.notes.append(f"restored the previous output {str(self.path)!r} from {p.name}, left by an "
                                  "interrupted replace")
            else:
                _remove(p)
                self.notes.append(f"removed {p.name}, a previous output left by an interrupted replace")
        for p in sorted(parent.glob(f".{name}.esm-tmp-*")):
            ours = (p / WRITING).is_file() if p.is_dir() else True
            if ours:
                _remove(p)
                self.notes.append(f"removed {p.name}, the temporary output of an interrupted run")
        for p in sorted(parent.glob(f".{name}.tmp-*")):  # written by esm_core before version 0.2
            self.notes.append(f"found {str(p)!r}, left by an interrupted run of an older esm_core; "
                              "remove it by hand")

    # -------------------------------------------------------------- writing
    def _recheck(self) -> None:
        # the lock keeps other esm_core runs out; a user may still have created the path meanwhile
        check_output(self.path, kind=self.kind, overwrite=self.overwrite, inputs=self.inputs, what=self.what)

    def write_dir(self, write: Callable[[Path], None], *, meta: dict | None = None) -> Path:
        """Run write(tmp_dir), add the marker, and rename tmp_dir into place."""
        if self.kind != "dir" or self.written:
            raise RuntimeError("write_dir: not a directory reservation, or written already")
        self._recheck()
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.esm-tmp-", dir=self.path.parent))
        try:
            (tmp / WRITING).write_text(json.dumps(dict(pid=os.getpid(), target=str(self.path))))
            write(tmp)
            (tmp / WRITING).unlink()
            files = _listing(tmp)
            marker = dict(format=MARKER_FORMAT, tool="esm_core", command=self.command, files=files,
                          created=time.strftime("%Y-%m-%d %H:%M:%S"), **(meta or {}))
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            _fsync_dir(tmp)
            self._move_into_place(tmp)
        except BaseException:
            _remove(tmp)
            raise
        self.written = True
        return self.path

    def write_file(self, data: bytes | str) -> Path:
        """Write the file's bytes to a temporary sibling and rename it into place."""
        if self.kind != "file" or self.written:
            raise RuntimeError("write_file: not a file reservation, or written already")
        self._recheck()
        raw = data.encode() if isinstance(data, str) else bytes(data)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.esm-tmp-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.written = True
        return self.path

    def _move_into_place(self, tmp: Path) -> None:
        out = self.path
        if not os.path.lexists(out):
            os.rename(tmp, out)
            return
        old = out.parent / f".{out.name}.esm-old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _remove(old)


def reserve_output(path: str | os.PathLike, *, kind: str = "dir", overwrite: bool = False,
                   inputs: Iterable[Input] = (), what: str = "--out", command: str = "esm_core",
                   log: Callable[[str], None] | None = None) -> Reservation:
    """Check an output path, lock it and clean an interrupted run's left-overs (see the module doc).

    Refusals are ESMError and happen before any work; ``log`` receives one line per clean-up."""
    inputs = tuple(inputs)
    out = check_output(path, kind=kind, overwrite=overwrite, inputs=inputs, what=what)
    r = Reservation(out, kind, overwrite, inputs, what, command)
    try:
        r._acquire()
    except FileNotFoundError:
        raise ESMError(f"{what} {str(out)!r} cannot be created.", fix=f"choose another {what}.") from None
    except PermissionError:
        raise ESMError(f"{what} {str(out)!r} cannot be written (permission denied).",
                       fix=f"choose a {what} in a directory you can write to.") from None
    try:
        r._clean_leftovers()
        check_output(out, kind=kind, overwrite=overwrite, inputs=inputs, what=what)  # after a restore
    except BaseException:
        r.release()
        raise
    for n in r.notes:
        (log or _stderr)(f"note: {n}")
    return r


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

# ------------------------------------------------------------------------------------ files
def file_hash(path: str | Path, full_limit: int = 256 * 2**20) -> str:
    """sha256 of a file; for files over full_limit, of its size, first and last 4 MiB ('partial:')."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if size <= full_limit:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            return h.hexdigest()
        h.update(str(size).encode())
        h.update(f.read(4 * 2**20))
        f.seek(size - 4 * 2**20)
        h.update(f.read())
    return "partial:" + h.hexdigest()


def dir_hashes(directory: str | Path, patterns=("*.json", "*.safetensors", "*.model", "*.txt")) -> dict[str, str]:
    d = Path(directory)
    if not d.is_dir():
        return {}
    out = {}
    for pat in patterns:
        for f in sorted(d.glob(pat)):
            out[f.name] = file_hash(f)
    return out


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "safetensors", "pot", "numpy", "rdkit", "umap-learn", "streamlit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass

    out["esm_core"] = __version__
    return out


def zip_files(files: dict[str, bytes], folder: str = "") -> bytes:
    """A zip (in memory) of relative path -> bytes, all under ``folder/`` when given."""
    import io
    import zipfile

    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for rel in sorted(files):
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ValueError(f"not a relative path inside the archive: {rel!r}")
            z.writestr(prefix + rel, files[rel])
    return buf.getvalue()
