"""Writing what the analysis produces: checked up front, written whole or not at all."""

from __future__ import annotations

import io
import os
import secrets
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bnlab.errors import UsageError

FIGURE_TYPES = {".png": "png", ".svg": "svg"}


def figure_type(path: Path, option: str) -> str:
    """`png` or `svg` from the file name; anything else is a usage error."""
    kind = FIGURE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise UsageError(
            f"{option} {path}: unsupported figure type {path.suffix or '(none)'!r}; "
            f"use a .png or .svg file name"
        )
    return kind


def check_writable(path: Path, option: str) -> None:
    """Fail before any work is done if `path` cannot be written."""
    parent = path.parent
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: no permission to write in {parent}")


def figure_bytes(fig: Figure, kind: str) -> bytes:
    # Agg needs no display; the figure never touches pyplot's global state.
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=kind, dpi=150)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a temporary file next to `path`, then rename it over `path`: a reader sees the
    old file or the new one, and a failure leaves the old one as it was."""
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as file:  # plain open: the new file gets the user's umask
            file.write(payload)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from err
