"""The one rule every writer follows (save_adapter, write_diffusers_lora, the CLI): where an output may go, what an
overwrite may replace, and how the new files are swapped in.

1. An output never is, contains, or lies inside an input (the adapters a merge read, plus what the caller names:
   calibration files, the base model folder). Paths are compared by the files they reach (device and inode), so
   symlinks, `x/..` and bind mounts do not slip through.
2. An existing path is replaced only with overwrite=True, and then only when everything in it is a file this write
   produces (`produces`: the adapter files, the report, the extra files of this write). Anything else in the folder
   (a Trainer's checkpoint-*/ and optimizer state, a README the write does not produce, ...) makes it a refusal that
   names those entries: nothing the user owns is deleted, and a kept file never describes another adapter.
3. A symbolic link, a special file (FIFO, device, socket), the current directory, its parents, the home folder
   and the root are never destinations. The parent must be writable, and a folder to replace too: both are tried
   before any slow work (check_destination).
4. A lock file beside the destination (flock, released by the kernel when its holder dies) keeps two writers of
   one destination apart: the second gets an ExportError at once, and never touches the first one's staging files.
5. Files are written to a staging folder (or file) beside the destination, then swapped in with renames, so the
   destination holds the old or the new complete output, never a mix (see replace_folder). A replaced folder and
   its files keep their permission bits.
"""
from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from ..errors import ExportError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (documented in docs/reliability.md)
    fcntl = None

_local = threading.local()
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
REPORT_FILES = ("iteris_report.json",)  # describes the adapter beside it: never kept next to a new one
STAGING, ASIDE, LOCK, PROBE = ".iteris-staging-", ".iteris-old-", ".iteris-lock", ".iteris-probe-"
# errors of the machine, not of the code: turned into one clear ExportError
_ENVIRONMENT = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def normalise(path) -> Path:
    """The absolute path with `.` and `..` removed (lexically: `x/..` is x's parent, never a name "..")."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def describe(path: Path) -> str | None:
    """What a path that is not a plain file or folder is ("a symbolic link to ...", "a FIFO (named pipe)", ...),
    None for a file, a folder, or nothing."""
    if path.is_symlink():
        target = os.readlink(path)
        if not path.exists():
            return f"a symbolic link to {target}, which does not exist"
        inner = describe(path.resolve())
        return f"a symbolic link to {target}" + (f" ({inner})" if inner else "")
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return None


# -- 1-3: the check, before any slow work ----------------------------------------------------------------------

def check_destination(path, overwrite: bool = False, *, inputs: Iterable = (), produces: Iterable[str] = ADAPTER_FILES,
                      kind: str = "folder", replaceable: Callable[[Path], str | None] | None = None) -> Path:
    """Refuse a destination the rule forbids (ExportError naming the problem and the fix); returns its normalised
    path. kind "folder": an adapter folder holding `produces`; kind "file": one file, which replaceable(path) (a
    reason it may not be replaced, or None) vets before an overwrite. Nothing is created or changed; call it
    before the slow work (the writers call it again when they write)."""
    return _check(path, overwrite, list(inputs), tuple(produces), kind, replaceable, probe_lock=True)


def _check(path, overwrite, inputs, produces, kind, replaceable, probe_lock: bool) -> Path:
    target = normalise(path)
    odd = describe(target)
    if odd:
        raise ExportError(f"{path} is {odd}; a link or a special file is never replaced nor written through. "
                          f"Give a new {kind} name (or the real path the link points to).")
    if kind == "folder" and target.exists() and not target.is_dir():
        raise ExportError(f"{path} is an existing file, not a folder; give a folder name for the adapter.")
    if kind == "file" and target.is_dir():
        raise ExportError(f"{path} is a folder, not a file; give a file name (e.g. {target / 'merged.safetensors'}).")
    _refuse_protected(path, target)
    _refuse_inputs(path, target, inputs)
    _refuse_unwritable(path, target)
    if probe_lock:  # the writers check again while holding the lock themselves
        _refuse_locked(target)
    if not target.exists():
        return target
    if not overwrite:
        raise ExportError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    if kind == "file":
        reason = replaceable(target) if replaceable else None
        if reason:
            raise ExportError(f"{path} {reason}, so it is not replaced even with overwrite; choose a new file name.")
        return target
    _refuse_foreign(path, target, set(produces))
    if not os.access(target, os.W_OK | os.X_OK):
        raise ExportError(f"{path} is read-only, so its old files could not be removed; make it writable "
                          "(chmod u+w) or choose another folder.")
    return target


def _refuse_protected(path, target: Path) -> None:
    here = Path.cwd().resolve()
    resolved = target.resolve()
    if resolved == here or resolved in here.parents or resolved == Path.home().resolve() or resolved.parent == resolved:
        raise ExportError(f"{path} is the current directory, one of its parents, the home folder or the root; "
                          "write the adapter to a new subfolder (e.g. --out merged_adapter).")


def _identities(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of `path` and of each of its existing parents, innermost first."""
    out = []
    for place in [path, *path.parents]:
        try:
            info = place.stat()
        except OSError:
            continue
        out.append((info.st_dev, info.st_ino))
    return out


def _refuse_inputs(path, target: Path, inputs: Iterable) -> None:
    """An output is never an input, never holds one, never lies inside one."""
    mine = _identities(target.resolve())
    own = mine[0] if target.exists() else None
    for given in inputs:
        source = normalise(given)
        if not source.exists():
            continue
        theirs = _identities(source.resolve())
        if own is not None and own == theirs[0]:
            raise ExportError(f"{path} is an input of this write ({given}); writing there would replace it. "
                              "Choose a new folder for the output.")
        if own is not None and own in theirs:
            raise ExportError(f"{path} contains an input of this write ({given}); replacing it would delete that "
                              "input. Choose a new folder for the output.")
        if theirs[0] in mine and source.is_dir():
            raise ExportError(f"{path} lies inside an input of this write ({given}); writing there would change "
                              "that input. Choose a folder outside it.")


def _nearest_existing(path: Path) -> Path:
    for place in path.parents:
        if place.exists():
            return place
    return Path(path.anchor)


def _refuse_unwritable(path, target: Path) -> None:
    """Try what the write will do: create an entry in the (nearest existing) parent folder."""
    parent = _nearest_existing(target)
    probe = parent / f".{target.name}{PROBE}{secrets.token_hex(4)}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as err:
        raise ExportError(f"cannot write {path}: creating a file in {parent} fails ({err.strerror}); choose a folder "
                          "you can write to.") from err


def _refuse_locked(target: Path) -> None:
    """Fail early when another writer holds the destination's lock (the real lock is taken at write time)."""
    lock = _lock_path(target)
    if fcntl is None or not lock.exists() or lock in _held():
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return  # gone in between: nobody is writing
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ExportError(_busy(target, lock)) from None
    finally:
        os.close(fd)


def _refuse_foreign(path, target: Path, produces: set[str]) -> None:
    entries = sorted(p.name for p in target.iterdir())
    if entries and "adapter_config.json" not in entries:
        raise ExportError(f"{path} is not an adapter folder (no adapter_config.json), so it is not replaced even "
                          "with overwrite: its files would be lost. Choose another folder, or move its files away "
                          "first.")
    foreign = [name for name in entries if name not in produces]
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise ExportError(f"{path} holds {shown} besides the adapter: overwrite replaces only the files this write "
                          f"produces ({', '.join(sorted(produces))}), and nothing else is deleted. Move those "
                          "entries away, or write the adapter to a new folder.")


# -- 4. the lock -------------------------------------------------------------------------------------------------

def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK}"


def _busy(target: Path, lock: Path) -> str:
    try:
        holder = lock.read_text().strip()
    except OSError:
        holder = ""
    who = f"process {holder}" if holder else "another process"
    return (f"{who} is writing {target} right now (lock file {lock}); wait until it has finished, or choose "
            "another destination.")


def _held() -> set:
    """The lock files this thread holds: a caller (the CLI) may hold a destination's lock for a whole run, and the
    writer it calls then writes under that same lock."""
    if not hasattr(_local, "held"):
        _local.held = set()
    return _local.held


@contextmanager
def writer_lock(target):
    """Hold the destination's lock file (exclusive flock) for the block; ExportError at once if another process or
    thread holds it. Re-entrant within a thread."""
    lock = _lock_path(normalise(target))
    if fcntl is None or lock in _held():
        yield
        return
    created = _make_parents(lock)  # removed again on exit when still empty
    try:
        with _locked(lock, target):
            yield
    finally:
        _remove_empty(created)


@contextmanager
def _locked(lock: Path, target):
    """flock on the lock file (created if needed); unlinked on release."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportError(_busy(target, lock)) from None
        try:  # the holder we raced with may have unlinked the file: only the one at the path counts
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _held().add(lock)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        _held().discard(lock)
        try:
            os.unlink(lock)  # while still locked, so no one else can be holding this file
        except OSError:
            pass
        os.close(fd)


# -- 5. staged writes ----------------------------------------------------------------------------------------------
# The new folder is written to a staging folder next to the target; then the old folder is renamed aside, the
# staging folder renamed into place, and the old one deleted. A kill between any two steps leaves the old or the
# new complete output: at the target, or (between the two renames, a few microseconds) in the "old" folder, which
# the next write to the same target renames back (recover). Leftovers of killed runs are deleted by the next write
# to the same target, under the lock, so never while their writer is alive.

def write_folder(path, fill: Callable[[Path], None], *, overwrite: bool = False, inputs: Iterable = (),
                 produces: Iterable[str] = ADAPTER_FILES) -> Path:
    """Check `path` (check_destination), then under its lock call fill(staging) and swap the staging folder in."""
    inputs, produces = list(inputs), tuple(produces)
    target = check_destination(path, overwrite, inputs=inputs, produces=produces)
    created = _make_parents(target)
    try:
        with _environment(target), writer_lock(target):
            _recover(target)
            _check(path, overwrite, inputs, produces, "folder", None, probe_lock=False)  # as it is now, locked
            replace_folder(target, fill)
    except BaseException:
        _remove_empty(created)
        raise
    return target


def write_file(path, fill: Callable[[Path], None], *, overwrite: bool = False, inputs: Iterable = (),
               replaceable: Callable[[Path], str | None] | None = None) -> Path:
    """Check `path` as a file destination, then under its lock call fill(staging file) and rename it into place."""
    inputs = list(inputs)
    target = check_destination(path, overwrite, inputs=inputs, kind="file", replaceable=replaceable)
    created = _make_parents(target)
    try:
        with _environment(target), writer_lock(target):
            _recover(target)
            _check(path, overwrite, inputs, (), "file", replaceable, probe_lock=False)
            staging = _new_staging(target, folder=False)
            try:
                umask_mode = stat.S_IMODE(staging.stat().st_mode)  # 0666 less the umask
                fill(staging)
                _set_mode(staging, target, umask_mode)
                os.replace(staging, target)
            finally:
                staging.unlink(missing_ok=True)
    except BaseException:
        _remove_empty(created)
        raise
    return target


def write_text(path, text: str, *, inputs: Iterable = ()) -> Path:
    """A results file the user named (e.g. --json PATH) written through the rule: never an input, never a folder,
    staged and renamed into place under the destination's lock; a file already there is replaced, as asked."""
    return write_file(path, lambda staging: staging.write_text(text, encoding="utf-8"), overwrite=True,
                      inputs=inputs)


def replace_folder(directory: Path, fill: Callable[[Path], None]) -> None:
    """Call fill(staging) to write the new folder, then swap it in for `directory` (see the comment above). The
    caller holds the lock."""
    staging = _new_staging(directory, folder=True)
    file_mode = stat.S_IMODE(staging.stat().st_mode) & 0o666  # what the umask gives a new file
    aside = None
    try:
        fill(staging)
        for new in staging.iterdir():  # safetensors writes 0600 files: give them the umask's or the old mode
            if new.is_file() and not new.is_symlink():
                _set_mode(new, directory / new.name, file_mode)
        if directory.exists():
            _set_mode(staging, directory, None)
            aside = directory.parent / f".{directory.name}{ASIDE}{staging.name.rsplit('-', 1)[-1]}"
            _rename(directory, aside)
        try:
            _rename(staging, directory)
        except BaseException:
            if aside is not None:
                _rename(aside, directory)
                aside = None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def recover(target) -> None:
    """Undo what a killed writer left next to `target`: restore the old folder if the new one never arrived, delete
    leftover staging folders/files, old copies and the lock file. ExportError if a live writer holds the lock."""
    target = normalise(target)
    if target.parent.is_dir():
        with writer_lock(target):
            _recover(target)


def _recover(target: Path) -> None:
    """recover's work; the caller holds the lock."""
    parent = target.parent
    if not parent.is_dir():
        return
    name = glob.escape(target.name)
    asides = sorted(parent.glob(f".{name}{ASIDE}*"), key=lambda p: p.stat().st_mtime)
    if asides and not target.exists():
        _rename(asides.pop(), target)
    for leftover in asides + list(parent.glob(f".{name}{STAGING}*")):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _new_staging(target: Path, folder: bool) -> Path:
    """A new, empty staging folder or file beside `target`, created with the user's umask (not 0700/0600)."""
    while True:
        staging = target.parent / f".{target.name}{STAGING}{secrets.token_hex(4)}"
        try:
            if folder:
                os.mkdir(staging, 0o777)
            else:
                os.close(os.open(staging, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return staging
        except FileExistsError:
            continue


def _set_mode(new: Path, old: Path, default: int | None) -> None:
    """Give `new` the permission bits of the `old` it replaces (a shared 755 adapter stays 755), or `default`."""
    try:
        mode = stat.S_IMODE(old.stat().st_mode)
    except FileNotFoundError:
        mode = default
    if mode is not None:
        os.chmod(new, mode)


def _make_parents(target: Path) -> list[Path]:
    """Create the missing parents of `target`; returns them (outermost first) so a failed write removes them."""
    missing = [p for p in reversed(target.parents) if not p.exists()]
    for place in missing:
        place.mkdir(exist_ok=True)
    return missing


def _remove_empty(created: list[Path]) -> None:
    for place in reversed(created):
        try:
            place.rmdir()
        except OSError:
            break


@contextmanager
def _environment(target: Path):
    """A full disk, a read-only file system, a permission problem: one ExportError that says what is left."""
    try:
        yield
    except OSError as err:
        if err.errno not in _ENVIRONMENT:
            raise
        state = "the old output is unchanged" if target.exists() else "nothing was written"
        raise ExportError(f"could not write {target}: {_ENVIRONMENT[err.errno]} ({err.strerror}: "
                          f"{err.filename or target}); {state}.") from err


def _rename(source: Path, destination: Path) -> None:
    os.rename(source, destination)
