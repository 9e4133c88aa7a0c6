"""File modes of generated model folders.

A model folder is data that other users read: the uid 10001 of the Docker images, other
accounts sharing a cache, a mounted volume. safetensors writes its file 0600 and
``tempfile.mkdtemp`` makes a 0700 folder, so left alone a generated model is readable by its
writer only. ``make_readable`` sets every folder to 0755 and every file to 0644, whatever
the umask: the weights are random and the tokenizer is generated, so nothing is secret.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o755
FILE_MODE = 0o644


def make_readable(folder: str | Path) -> None:
    """``folder`` and everything under it: folders 0755, files 0644 (links left alone)."""
    root = Path(folder)
    root.chmod(DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(DIR_MODE)
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                path.chmod(FILE_MODE)
