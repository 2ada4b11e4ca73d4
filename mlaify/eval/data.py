"""Where evaluation data lives, and fingerprints of the files a result was computed on.

Offline machines cannot reach a dataset hub, so every evaluation can read a local data dir laid out
like `../shared/evaldata/` (see its README); `$MLAIFY_DATA` names it when no flag does.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from ..errors import MlaifyError

WIKITEXT2_TEST = Path("wikitext2") / "wiki.test.raw"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The data dir to use: the argument, else `$MLAIFY_DATA`, else None (standard hub datasets)."""
    chosen = data_dir or os.environ.get("MLAIFY_DATA") or None
    if chosen is None:
        return None
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise MlaifyError(
            f"data dir does not exist: {chosen}; pass --data-dir or set MLAIFY_DATA to a folder"
        )
    return path


def default_ppl_text(data_dir: str | Path | None = None) -> Path:
    """WikiText-2 test inside the data dir: the text of the reference perplexity protocol."""
    root = resolve_data_dir(data_dir)
    if root is None:
        raise MlaifyError("no perplexity text: pass --ppl-text FILE, or --data-dir DIR (or set MLAIFY_DATA)")
    path = root / WIKITEXT2_TEST
    if not path.is_file():
        raise MlaifyError(f"{path} not found; put WikiText-2 raw test there or pass --ppl-text FILE")
    return path


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file (cached per path, size and mtime: reports hash the same files often)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
