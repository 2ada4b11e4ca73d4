"""Build the calibration text bundled with the package (mlaify/data/calibration_gutenberg.txt).

Public-domain prose, so that `mlaify convert` calibrates (and refits) by default without a file
from the user: CHUNKS passages of about CHUNK_CHARS characters, cut at blank lines, evenly spaced
through ../shared/traindata/gutenberg_train.txt (140 Project Gutenberg books in one file), so that
the slice samples most of the books rather than a few. Deterministic: the same input gives the
same bytes (the sha256 goes into mlaify/data/README.md).

    python scripts/make_calibration_text.py
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "traindata" / "gutenberg_train.txt"
OUT = ROOT / "mlaify" / "data" / "calibration_gutenberg.txt"
CHUNKS = 120
CHUNK_CHARS = 7_500


def chunk_at(text: str, start: int) -> str:
    """The whole paragraphs from the first blank line at or after `start`, about CHUNK_CHARS long."""
    begin = text.index("\n\n", start) + 2
    end = text.find("\n\n", begin + CHUNK_CHARS)
    return text[begin : end if end > 0 else len(text)].strip()


def main() -> None:
    text = SOURCE.read_text(encoding="utf-8")
    step = (len(text) - 2 * CHUNK_CHARS) // CHUNKS
    chunks = [chunk_at(text, i * step) for i in range(CHUNKS)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n\n".join(chunks) + "\n", encoding="utf-8")
    data = OUT.read_bytes()
    print(f"{OUT.relative_to(ROOT)}: {len(data):,} bytes, {CHUNKS} chunks every {step:,} characters")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
