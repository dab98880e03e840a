"""Files written whole or not at all: each goes to a temporary file beside its place, then is
renamed over it, so that a run killed while writing never leaves half a checkpoint or record.
Checkpoints and embeddings carry their SHA-256 inside, checked when they are read, and a
write that fails (a full disk, a quota, a read-only folder) says so in one line."""
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
CHECKED_FORMAT = "melo-checked-1"   # a torch file {format, sha256, payload: the saved object's bytes}
CHECKED_FIELDS = ("format", "sha256", "payload")
TEMPORARY_PREFIX = "."             # temporary files are ".<name>.<random>" beside their place


class WriteError(OSError):
    """A file that could not be written (nothing of it is left); the message names the file,
    the reason and the free space."""


class DamagedFile(ValueError):
    """A checked file whose content does not match its SHA-256, or that lost its fields."""


class LockHeld(OSError):
    """A lock that another live process holds; the message is what it wrote: its pid and host."""


@contextlib.contextmanager
def exclusive_lock(path):
    """Hold an exclusive lock on ``path`` (made when missing), writing this process's pid, host
    and start time in it; LockHeld at once when another process holds it. The OS lets go of it
    when the holder dies, so a lock is never stale."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LockHeld(handle.read().strip() or "another process") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield


def remove_temporaries(path):
    """Remove the temporary files that a killed process's writes of ``path`` left beside it."""
    for leftover in Path(path).parent.glob(f"{TEMPORARY_PREFIX}{Path(path).name}.*"):
        leftover.unlink(missing_ok=True)


def atomic_write(path, write):
    """``write(temporary path)``, then the temporary file renamed to ``path`` (its folder is
    made when missing); a WriteError when that fails."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{path.name}.")
    except OSError as error:
        raise write_error(path, error) from None
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() would give
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise write_error(path, error) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_error(path, error):
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            reason += f" ({shutil.disk_usage(path.parent).free / 2**20:,.0f} MB free there)"
        except OSError:
            pass
    return WriteError(error.errno, f"cannot write {path}: {reason}")


def save_checked(obj, path):
    """torch.save ``obj`` to ``path`` with the SHA-256 of its bytes inside."""
    import torch
    payload = io.BytesIO()
    torch.save(obj, payload)
    payload = payload.getvalue()
    wrapped = io.BytesIO()
    torch.save({"format": CHECKED_FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}, wrapped)
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(wrapped.getvalue()))


def load_checked(path, **options):
    """What save_checked wrote, after checking its SHA-256 (DamagedFile when it differs); a
    file written without one (by an earlier version) is loaded as it is. ``options`` go to
    torch.load."""
    import torch
    outer = torch.load(path, **options)
    if not (isinstance(outer, dict) and any(field in outer for field in CHECKED_FIELDS)):
        return outer
    if lost := [field for field in CHECKED_FIELDS if field not in outer]:
        raise DamagedFile(f"{path} is damaged: its checksum wrapper lost its {', '.join(map(repr, lost))}")
    if outer["format"] != CHECKED_FORMAT:
        raise DamagedFile(f"{path} is damaged or of an unknown format ({outer['format']!r})")
    if hashlib.sha256(outer["payload"]).hexdigest() != outer["sha256"]:
        raise DamagedFile(f"{path} is damaged: its content does not match the checksum written with it")
    return torch.load(io.BytesIO(outer["payload"]), **options)


def write_json(path, value, indent=2):
    """``value`` as JSON at ``path``, indented (``indent=None``: on one line, for files of many
    numbers); a NaN or infinity is an error, never a file."""
    text = json.dumps(value, indent=indent, separators=None if indent else (",", ":"), allow_nan=False)
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))
