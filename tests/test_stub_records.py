"""The stub bookkeeping on a front's request path (triton_models.shared): busy markers, engine
records, request keys. Their end-to-end use (a front killed while busy reloads its engine; a dead
engine ends a front's wait) runs in tests/test_reliability.py against a real tritonserver."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from triton_models import shared


def _record(folder, name: str, pid: int, start: int) -> None:
    """A stub record written as register_stub writes it: aside, then moved in place."""
    tmp = folder / f".{name}.tmp"
    tmp.write_text(f"{pid} {start}\n")
    os.replace(tmp, folder / name)


def _age(folder, seconds: float) -> None:
    """Set the folder's mtime `seconds` into the past (as if its last change were that old)."""
    then = time.time() - seconds
    os.utime(folder, (then, then))


@pytest.fixture(params=["mapped", "written"])
def busy_byte(request, tmp_path, monkeypatch):
    """A stub's busy marker, mapped into memory or (a file system refusing shared mappings) written."""
    if request.param == "written":
        def refuse(*args, **kwargs):
            raise OSError("no shared mappings here")
        monkeypatch.setattr(shared.mmap, "mmap", refuse)
    path = tmp_path / ("f5_tts_0_3" + shared.BUSY_SUFFIX)
    flag = shared._BusyFlag(path, os.getpid())
    assert (flag.map is None) == (request.param == "written")
    monkeypatch.setattr(shared, "_BUSY", flag)
    return path


def test_busy_marker_follows_the_request(busy_byte):
    assert busy_byte.read_bytes() == shared.BUSY_NO and not shared.is_busy(busy_byte)
    with shared.BusyMarker():
        assert shared.is_busy(busy_byte), "another process reading the file sees the mapped byte"
    assert not shared.is_busy(busy_byte)
    with pytest.raises(RuntimeError):
        with shared.BusyMarker():
            raise RuntimeError("the request failed")
    assert not shared.is_busy(busy_byte), "a failed request clears the mark too"
    assert not shared.is_busy(busy_byte.with_name("f5_tts_0_4" + shared.BUSY_SUFFIX)), "no marker: not busy"


def test_busy_mark_outlives_a_killed_process(tmp_path):
    """What a process wrote into the mapping is in the file after it died without any clean-up."""
    path = tmp_path / ("f5_tts_0_1" + shared.BUSY_SUFFIX)
    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from triton_models import shared; "
            "shared._BUSY = shared._BusyFlag(Path(sys.argv[1]), os.getpid()); "
            "shared.BusyMarker().__enter__(); os._exit(9)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, str(path), root], timeout=60)
    assert proc.returncode == 9
    assert shared.is_busy(path)
    shared._BusyFlag(path, os.getpid())  # the instance registered again: a fresh, idle marker
    assert not shared.is_busy(path)


def test_engine_records_are_read_again_when_a_stub_registers(tmp_path):
    folder = tmp_path / "stubs"
    folder.mkdir()
    _record(folder, "f5_engine_0_0", 101, 5)
    _record(folder, "f5_engine_extra_0_0", 102, 5)  # another model whose name starts the same
    (folder / ("f5_engine_0_0" + shared.BUSY_SUFFIX)).write_bytes(shared.BUSY_NO)
    assert shared.engine_records(folder, "f5_engine") == {"f5_engine_0_0": (101, 5)}
    _age(folder, 10)
    first = shared.engine_records(folder, "f5_engine")
    assert shared.engine_records(folder, "f5_engine") is first, "an unchanged folder is not read again"
    _record(folder, "f5_engine_0_0", 201, 9)  # the engine reloaded: its record replaced
    assert shared.engine_records(folder, "f5_engine") == {"f5_engine_0_0": (201, 9)}
    _record(folder, "f5_engine_1_0", 301, 9)  # within the same second: changes inside one tick count
    assert shared.engine_records(folder, "f5_engine") == {"f5_engine_0_0": (201, 9), "f5_engine_1_0": (301, 9)}


def test_engine_records_of_a_folder_that_is_gone(tmp_path):
    assert shared.engine_records(tmp_path / "missing", "f5_engine") == {}


def test_request_keys_are_unique_across_processes():
    keys = {shared.request_key() for _ in range(10_000)}
    assert len(keys) == 10_000 and all(len(k) >= 32 and int(k, 16) >= 0 for k in keys)
    code = "from triton_models import shared; print(shared.request_key())"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    assert other and other not in keys and other[:16] != next(iter(keys))[:16], "each process its own prefix"
