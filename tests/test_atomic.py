"""Atomic writes keep the file mode a plain write would give: umask-derived for a new file,
unchanged for an existing one (mkstemp alone would leave every file 0600)."""

import os
import stat

import pytest

from drcl import atomic
from drcl.atomic import atomic_write, write_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_new_file_gets_the_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    assert _mode(atomic_write(tmp_path / "w.bin", lambda f: f.write(b"x"))) == expected
    assert _mode(write_json(tmp_path / "sub" / "m.json", {"a": 1})) == expected
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.json", "sub", "w.bin"]  # no temp file left


def test_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "shared.json"
    path.write_text("{}")
    os.chmod(path, 0o660)
    write_json(path, {"b": 2})
    assert _mode(path) == 0o660 and path.read_text() == '{\n  "b": 2\n}'


def test_umask_without_proc_is_the_same(umask, monkeypatch):
    umask(0o037)
    assert atomic._umask() == 0o037
    monkeypatch.setattr(atomic.Path, "read_text", lambda self: (_ for _ in ()).throw(OSError("no /proc")))
    assert atomic._umask() == 0o037
    assert os.umask(0o037) == 0o037  # the fallback put the umask back
