"""Files written whole or not at all: each goes to a temporary file beside its place, then is
renamed over it, so that a run killed while writing never leaves half a checkpoint or record."""
import json
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write):
    """``write(temporary path)``, then the temporary file renamed to ``path`` (its folder is
    made when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp's 0600 -> what open() would give
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_save(obj, path):
    """torch.save ``obj`` to ``path``."""
    import torch
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def write_json(path, value):
    """``value`` as indented JSON at ``path``; a NaN or infinity is an error, never a file."""
    text = json.dumps(value, indent=2, allow_nan=False)
    atomic_write(path, lambda temporary: Path(temporary).write_text(text))
