"""Writing files safely: every file minisd writes (models, adapters, checkpoints, images) goes
through `atomic_write`, so a crash or a bad argument never leaves a half-written file behind."""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Union


def atomic_write(path: Union[str, Path], write) -> None:
    """Call write(tmp_path), then rename onto `path`: a crash or an error never leaves a
    half-written file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"output folder {folder} does not exist")
    tmp = _new_empty_file_beside(path)
    try:
        # what open(path, "w") would give: the mode of the file it replaces, else 0o666 less the
        # umask
        mode = stat.S_IMODE(os.stat(path if path.is_file() else tmp).st_mode)
        write(tmp)
        # writers that save through a temporary file of their own (safetensors) leave 0o600
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_empty_file_beside(path: Path) -> str:
    """A fresh empty `.NAME.RANDOM.tmp` next to `path`, created as open(path, "w") would create
    `path`.

    Its mode is 0o666 less the umask, applied by the system (tempfile.mkstemp would make it 0o600,
    and the rename would hand that on to the saved file). O_EXCL: never an existing file, nor a link
    planted under the name.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue  # the name is taken: draw another
        return str(tmp)
