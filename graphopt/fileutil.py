"""Writes that cannot destroy: every file or folder graphopt writes appears whole or not at
all, and an existing output is replaced only once its replacement is complete.

- `atomic_path(path)`: a temporary file beside `path`, renamed onto it on success.
- `write_text_atomic(path, text)` / `write_bytes_atomic`: the one-call form.
- `atomic_dir(path)`: a temporary folder beside `path`; on success it takes `path`'s place
  with one atomic exchange of the two names (Linux `renameat2(RENAME_EXCHANGE)`), or two
  renames where the system has no exchange -- then a kill between them leaves the old
  folder whole under `.NAME.old`, never a mix of old and new files. The scratch folder's
  name holds the writer's pid; the next write sweeps scratch folders of dead writers.
- `check_output_dir(path, inputs, overwrite)`: decides, before any work, whether `-o` may
  be written: a missing folder, an empty one, or a graphopt artifact folder; anything else
  (a folder of the user's own files) only with `--overwrite`, and never a folder holding
  the input model or the current working directory.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import secrets
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from graphopt.errors import UserError
from graphopt.manifest import MANIFEST_FORMAT

try:
    import fcntl  # the scratch folder's writer holds a lock on it (POSIX)
except ImportError:  # pragma: no cover - Windows: the writer's pid instead
    fcntl = None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is flushed and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync(tmp)
        if tmp.is_file():  # mkstemp's file is private (0600): give it the mode any other new file gets
            _publish(tmp, _umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def json_text(obj, **kwargs) -> str:
    """`obj` as strict JSON: a NaN or infinity (a diverged metric) becomes null, since JSON has
    no spelling for them and `json.dumps`'s bare `NaN` breaks every other parser (jq, JavaScript)."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj):
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # a numpy scalar
        return _finite(obj.item())
    return obj


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _scratch_name(path: Path) -> tuple[Path, str]:
    # `-o .` has no usable name of its own; name the scratch after the real folder (and write
    # through a symlinked -o to the folder it points at).
    real = Path(os.path.realpath(path))
    return real, real.name or "out"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole.

    The old folder stays untouched until the new one is complete; it is then exchanged
    with it in one step and removed. On any failure (or interrupt) the scratch folder is
    removed and `path` is as it was."""
    path, name = _scratch_name(Path(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise UserError(f"{path}: cannot write it: {e.filename or path.parent} is not writable") from None
    writer = _sweep_dead_scratch(path.parent, name)
    if writer is not None:  # two writers of one folder: the later would silently replace the other's result
        pid, scratch = writer
        raise UserError(f"{path}: another process (pid {pid}) is writing it now (into {scratch.name}); wait for it "
                        "to finish or give another folder")
    # The scratch folder's name is chosen before it is made, so that an interrupt at any point
    # after (SIGTERM becomes SystemExit, handled in whichever thread the kernel picks) finds
    # it in the cleanup below.
    tmp = path.parent / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # an existing folder's permissions stay (a private folder stays private), kept writable by its
    # owner, and so do its group and setgid bit (a shared folder whose files take its group)
    old = path.stat() if path.is_dir() else None
    old_mode = (old.st_mode & 0o7777) | 0o700 if old is not None else None
    try:
        tmp.mkdir(mode=0o700)
    except PermissionError:  # named after the folder asked for, not the scratch one beside it
        raise UserError(f"{path}: cannot write it: its folder {path.parent} is not writable") from None
    held = None
    try:
        held = _hold(tmp)  # while this process writes: the kernel lets go when it dies, whatever its pid
        if old is not None and (old.st_gid != tmp.stat().st_gid or old_mode & 0o2000):
            # before the files are made: they inherit it; a user outside the group keeps their own
            # group, without a setgid bit that would hand it on
            if not _keep_group(tmp, old.st_gid, old_mode & 0o2000):
                old_mode &= ~0o2000
        yield tmp
        mask = _umask()
        for f in tmp.iterdir():
            if f.is_file():
                _fsync(f)
                _publish(f, mask)  # as any new file (safetensors' files are private: 0600)
        tmp.chmod(old_mode if old_mode is not None else 0o777 & ~mask)  # private while written
        if not path.exists():
            os.replace(tmp, path)
        elif path.is_dir() and not any(path.iterdir()):
            os.replace(tmp, path)  # rename(2) onto an empty folder is atomic
        elif _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = path.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if held is not None:
            os.close(held)


def _keep_group(folder: Path, gid: int, setgid: int) -> bool:
    """Gives `folder` the group `gid` and the setgid bit where the user may (a member of the
    group) and says whether it could; otherwise it keeps the user's group, as any new folder."""
    try:
        os.chown(folder, -1, gid)
    except OSError:
        return False
    folder.chmod(0o700 | setgid)
    return True


def _hold(folder: Path) -> int | None:
    """An exclusive lock on `folder` (flock on its descriptor), or None where there is none."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _held_by_another(scratch: Path, pid: int) -> bool:
    """Whether a live writer holds `scratch` (its lock; without flock, by its `pid`, which a
    later process may have taken over)."""
    if fcntl is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    try:
        fd = os.open(scratch, os.O_RDONLY)
    except OSError:
        return False  # gone meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask can only set it: another thread
    creating a file meanwhile would get the stand-in) where /proc says it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(path: Path, mask: int) -> None:
    """The mode a file gets when made normally: rw for all less the umask, and x where it had one
    (a compiled library)."""
    executable = path.stat().st_mode & 0o111
    path.chmod((0o777 if executable else 0o666) & ~mask)


def _sweep_dead_scratch(parent: Path, name: str) -> tuple[int, Path] | None:
    """Remove scratch folders beside `name` left by a killed process (the scratch name holds
    the writer's pid; its writer holds a lock on it while it runs, which the kernel drops when
    it dies, so a pid taken over by another process does not keep it). Returns the pid and
    scratch folder of another process writing `name` now, if any."""
    prefix = f".{name}."
    writer = None
    for scratch in parent.glob(f".{glob.escape(name)}.*.tmp"):
        pid = scratch.name[len(prefix):].split(".")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if _held_by_another(scratch, int(pid)):
            writer = int(pid), scratch
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return writer


def artifact_extras(path: Path) -> list[str] | None:
    """For a folder `graphopt optimize` wrote (its manifest says so): the entries in it that
    are not part of the artifact (the user's own files). None when it is not an artifact."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    files = manifest.get("files")
    ours = {"manifest.json", "report.json"} | {f for f in (files if isinstance(files, list) else []) if isinstance(f, str)}
    return sorted(p.name for p in Path(path).iterdir() if p.name not in ours)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                     overwrite: bool = False, option: str = "-o") -> Path:
    """Refuse (one line, before any work) an output folder whose replacement would lose
    something the user owns: accepted are a missing folder, an empty one, and a graphopt
    artifact folder with nothing else in it; any other folder only with `overwrite`; never
    (not even with `overwrite`) a folder that holds the input, the current folder, the
    home folder or the root. Returns the path."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    shown = f"{option} {path}"
    if path.exists() and not path.is_dir():
        raise UserError(f"{shown}: exists and is not a folder")
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{shown}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):  # now, not after the export and the passes
                raise UserError(f"{shown}: cannot be written: {parent} is not writable")
            break
    for given in inputs:
        if _inside(Path(os.path.realpath(given)), real):
            raise UserError(f"{shown}: holds the input {given}; writing the artifact there would replace it "
                            "(give another output folder)")
    if not path.exists():
        return path
    if _inside(Path(os.path.realpath(os.getcwd())), real):
        raise UserError(f"{shown}: is the current folder (or holds it); give a new folder name such as out/")
    if real == Path(real.anchor) or _inside(Path(os.path.realpath(Path.home())), real):
        raise UserError(f"{shown}: refusing to replace {real} (it holds your home folder or is the root)")
    if not os.access(path, os.W_OK):
        raise UserError(f"{shown}: the folder is not writable (its permissions say so); give another folder")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return path
    extras = artifact_extras(path)
    if extras == [] or overwrite:
        return path
    if extras is None:
        what = f"is not a graphopt artifact ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'} in it)"
    else:
        what = f"is a graphopt artifact but also holds {', '.join(extras[:3])}" + (" ..." if len(extras) > 3 else "")
    raise UserError(f"{shown}: the folder exists and {what}; give a new or empty folder, "
                    "or --overwrite to replace it")


def check_output_files(paths: Iterable[str | os.PathLike],
                       inputs: Iterable[str | os.PathLike] | Mapping[str | os.PathLike, str | os.PathLike] = (), *,
                       overwrite: bool = False, option: str = "-o") -> None:
    """Refuse (one line, before anything is written) output files that would replace
    something the user owns. `paths` are the files one output writes, the one named by
    `option` first (then, say, the weights file beside it). A file that exists is replaced
    only with `overwrite` (a .gir is meant to be edited by hand, an .onnx may be the user's
    own model: neither can be told from a copy graphopt wrote), and never (not even with
    `overwrite`) one of `inputs` or a file inside an input folder. `inputs` may map each
    file to the input it belongs to (a .gir's weights file to the .gir)."""
    paths = [Path(p) for p in paths]
    owners = dict(inputs) if isinstance(inputs, Mapping) else {p: p for p in inputs}
    protected = {Path(os.path.realpath(p)): (str(p), str(owner)) for p, owner in owners.items()}
    for path in paths:
        exists = os.path.lexists(path)
        head = f"{option} {paths[0]}: " + ("" if path == paths[0] else
                                           f"would {'replace' if exists else 'write'} {path} beside it, which ")
        real = Path(os.path.realpath(path))
        for p, (given, owner) in protected.items():
            if _inside(real, p):  # a new file too: nothing is written inside an input folder
                what = "the input" if real == p and given == owner else "part of the input"
                raise UserError(f"{head}is {what} {owner}; give another output name")
        if not exists:
            continue
        if path.is_dir():
            raise UserError(f"{head}is a folder; give an output file name")
        if not overwrite:
            raise UserError(f"{head}exists; give a new name, or --overwrite to replace it")
