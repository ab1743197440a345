"""Identity and binary search (SPEC §1)."""

from __future__ import annotations

import os
import pathlib
import select
import time
from collections.abc import Iterator
from typing import Callable
from unittest import mock

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mproc
from mproc import _identity

WAIT = 10.0


def in_forked_child(report: Callable[[], str]) -> str:
    """Fork, run ``report()`` in the child, and return what it wrote; the child is reaped."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            try:
                text = report()
            except BaseException as err:
                text = f"error: {err!r}"
            os.write(w, text.encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks: list[bytes] = []
    try:
        deadline = time.monotonic() + WAIT
        while True:
            ready, _, _ = select.select([r], [], [], max(deadline - time.monotonic(), 0))
            assert ready, "the forked child did not report in time"
            chunk = os.read(r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return b"".join(chunks).decode()


# --- pid, ppid ----------------------------------------------------------------


def test_pid_is_this_process() -> None:
    assert mproc.pid() == os.getpid()


def test_pid_is_current_after_fork() -> None:
    parent = mproc.pid()
    report = in_forked_child(lambda: f"{mproc.pid()} {os.getpid()} {mproc.ppid_os()}")
    child_pid, child_os_pid, child_parent = map(int, report.split())
    assert child_pid == child_os_pid != parent
    assert child_parent == parent


def test_without_mproc_ppid_the_os_parent_is_the_parent() -> None:
    assert "MPROC_PPID" not in os.environ
    assert mproc.is_child() is False
    assert mproc.ppid() == os.getppid()
    assert mproc.ppid_os() == os.getppid()


@pytest.mark.parametrize("value", ["0", "", "garbage", "-5", "12x", "1.5"])
def test_mproc_ppid_that_names_no_launcher_is_not_a_child(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("MPROC_PPID", value)
    assert mproc.is_child() is False
    assert mproc.ppid() == os.getppid()


def test_mproc_ppid_names_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPROC_PPID", "424242")
    assert mproc.is_child() is True
    assert mproc.ppid() == 424242
    assert mproc.ppid_os() == os.getppid()


env_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))


@given(value=env_text)
def test_any_mproc_ppid_value_is_consistent(value: str) -> None:
    with mock.patch.dict(os.environ, {"MPROC_PPID": value}):
        child, parent = mproc.is_child(), mproc.ppid()
    assert isinstance(parent, int)
    if child:
        assert parent > 0
    else:
        assert parent == os.getppid()
    if value in ("", "0"):
        assert not child


@given(launcher=st.integers(min_value=1, max_value=2**31 - 1))
def test_positive_mproc_ppid_is_the_parent(launcher: int) -> None:
    with mock.patch.dict(os.environ, {"MPROC_PPID": str(launcher)}):
        assert mproc.is_child() is True
        assert mproc.ppid() == launcher


@given(value=st.integers(max_value=0))
def test_non_positive_mproc_ppid_is_not_a_child(value: int) -> None:
    with mock.patch.dict(os.environ, {"MPROC_PPID": str(value)}):
        assert mproc.is_child() is False
        assert mproc.ppid() == os.getppid()


# --- set_ppid -----------------------------------------------------------------


def test_set_ppid_sets_and_zero_removes() -> None:
    mproc.set_ppid(4242)
    assert os.environ["MPROC_PPID"] == "4242"
    assert mproc.is_child() and mproc.ppid() == 4242
    mproc.set_ppid(0)
    assert "MPROC_PPID" not in os.environ
    assert not mproc.is_child()
    mproc.set_ppid(0)  # removing what is not there is fine
    assert "MPROC_PPID" not in os.environ


def test_set_ppid_is_seen_by_a_forked_child() -> None:
    mproc.set_ppid(4242)
    assert in_forked_child(lambda: f"{mproc.is_child()} {mproc.ppid()}") == "True 4242"


def test_set_ppid_negative_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"PID >= 0.*got -1"):
        mproc.set_ppid(-1)
    assert "MPROC_PPID" not in os.environ


@pytest.mark.parametrize(
    ("bad", "shown"),
    [("12", "str: '12'"), (True, "bool: True"), (1.0, "float: 1.0"), (None, "None")],
)
def test_set_ppid_non_int_is_a_type_error(bad: object, shown: str) -> None:
    with pytest.raises(TypeError, match="needs an int PID") as info:
        mproc.set_ppid(bad)  # type: ignore[arg-type]
    assert shown in str(info.value)
    assert "MPROC_PPID" not in os.environ


# --- start_time, uptime -------------------------------------------------------


def test_start_time_is_the_os_creation_time_and_stable(monkeypatch: pytest.MonkeyPatch) -> None:
    first = mproc.start_time()
    assert first == psutil.Process().create_time()
    assert mproc.start_time() == first
    monkeypatch.setattr(_identity, "_start_time_cache", (-1, 0.0))
    assert mproc.start_time() == first
    assert first <= time.time()


def test_start_time_of_a_forked_child_is_its_own() -> None:
    parent = mproc.start_time()
    report = in_forked_child(lambda: f"{mproc.start_time()!r} {psutil.Process().create_time()!r}")
    child, child_psutil = map(float, report.split())
    assert child == child_psutil
    assert child >= parent


def test_uptime_is_positive_and_grows() -> None:
    first = mproc.uptime()
    assert first > 0
    assert abs(first - (time.time() - mproc.start_time())) < 5
    deadline = time.monotonic() + WAIT
    later = mproc.uptime()
    while later <= first and time.monotonic() < deadline:
        later = mproc.uptime()
    assert later > first


def test_uptime_stays_positive_if_the_clock_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_identity, "_start_time_cache", (os.getpid(), time.time() + 3600))
    assert mproc.uptime() > 0


# --- search_binary ------------------------------------------------------------


def make_file(path: pathlib.Path, mode: int = 0o755) -> pathlib.Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


@pytest.fixture
def path_dirs(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Two empty directories, ``first`` and ``second``, that make up ``PATH``."""
    dirs = [tmp_path / "first", tmp_path / "second"]
    for d in dirs:
        d.mkdir()
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, dirs)))
    yield [str(d) for d in dirs]


def test_search_binary_returns_an_existing_absolute_path(tmp_path: pathlib.Path) -> None:
    target = make_file(tmp_path / "data.txt", 0o644)  # any existing file, executable or not
    assert mproc.search_binary(str(target)) == str(target)
    assert mproc.search_binary(target) == str(target)


def test_search_binary_returns_a_path_relative_to_cwd(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, path_dirs: list[str]
) -> None:
    (tmp_path / "sub").mkdir()
    make_file(tmp_path / "sub" / "tool")
    make_file(tmp_path / "local")
    make_file(pathlib.Path(path_dirs[0]) / "local")
    monkeypatch.chdir(tmp_path)
    assert mproc.search_binary("sub/tool") == "sub/tool"
    assert mproc.search_binary("./local") == "./local"
    # An existing file in cwd wins over PATH, as in gproc.
    assert mproc.search_binary("local") == "local"


def test_search_binary_falls_back_to_path(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, path_dirs: list[str]
) -> None:
    tool = make_file(pathlib.Path(path_dirs[1]) / "tool")
    (tmp_path / "tool").mkdir()  # a directory in cwd with the name is not a file
    monkeypatch.chdir(tmp_path)
    assert mproc.search_binary("tool") == str(tool)


def test_search_binary_missing_is_none(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, path_dirs: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert mproc.search_binary("no-such-tool") is None
    assert mproc.search_binary(str(tmp_path / "no-such-tool")) is None
    assert mproc.search_binary("") is None


# --- search_binary_path -------------------------------------------------------


def test_search_binary_path_takes_the_first_executable_in_path_order(
    path_dirs: list[str],
) -> None:
    first, second = map(pathlib.Path, path_dirs)
    make_file(second / "tool")
    assert mproc.search_binary_path("tool") == str(second / "tool")
    make_file(first / "tool")
    assert mproc.search_binary_path("tool") == str(first / "tool")


def test_search_binary_path_skips_non_executables_and_directories(path_dirs: list[str]) -> None:
    first, second = map(pathlib.Path, path_dirs)
    make_file(first / "plain", 0o644)
    make_file(second / "plain")
    (first / "dir").mkdir()
    make_file(second / "dir")
    assert mproc.search_binary_path("plain") == str(second / "plain")
    assert mproc.search_binary_path("dir") == str(second / "dir")


def test_search_binary_path_none_when_only_non_executables(path_dirs: list[str]) -> None:
    first, second = map(pathlib.Path, path_dirs)
    make_file(first / "plain", 0o644)
    (second / "plain").mkdir()
    assert mproc.search_binary_path("plain") is None
    assert mproc.search_binary_path("missing") is None
    assert mproc.search_binary_path("") is None


def test_search_binary_path_does_not_search_names_with_a_slash(
    path_dirs: list[str], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_file(pathlib.Path(path_dirs[0]) / "tool")
    make_file(tmp_path / "tool")
    monkeypatch.chdir(tmp_path)
    assert mproc.search_binary_path("./tool") is None
    assert mproc.search_binary_path(str(tmp_path / "tool")) is None


def test_search_binary_path_gives_full_paths_for_relative_and_empty_entries(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rel").mkdir()
    make_file(tmp_path / "rel" / "one")
    make_file(tmp_path / "two")
    monkeypatch.chdir(tmp_path)
    # An empty PATH entry means the working directory, as in the shell.
    monkeypatch.setenv("PATH", os.pathsep.join(["rel", ""]))
    assert mproc.search_binary_path("one") == str(tmp_path / "rel" / "one")
    assert mproc.search_binary_path("two") == str(tmp_path / "two")


def test_search_binary_path_follows_symlinks(path_dirs: list[str], tmp_path: pathlib.Path) -> None:
    first, second = map(pathlib.Path, path_dirs)
    (first / "tool").symlink_to(tmp_path / "nowhere")  # dangling: skipped
    target = make_file(tmp_path / "real")
    (second / "tool").symlink_to(target)
    assert mproc.search_binary_path("tool") == str(second / "tool")


def test_search_binary_path_without_path_uses_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PATH")
    found = mproc.search_binary_path("sh")
    assert found is not None
    assert os.path.dirname(found) in os.defpath.split(os.pathsep)
    assert os.access(found, os.X_OK)
