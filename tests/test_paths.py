"""Tests for foundry_kernel.paths: run ids, file names, containment, default dirs.

Windows-style inputs are built with ``PureWindowsPath`` so the rules are checked on any
host: a file name that is fine on Linux but breaks on Windows must be refused here too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from foundry_kernel.atomic import atomic_write_bytes, atomic_write_text
from foundry_kernel.errors import ConfigError
from foundry_kernel.paths import (
    RUN_ID_MAX_LEN,
    RUN_ID_RE,
    _cache_dir_for,
    _data_dir_for,
    default_cache_dir,
    default_runs_dir,
    find_project_root,
    is_within,
    new_run_id,
    resolve_within,
    runs_dir_for,
    validate_run_id,
)

WINDOWS_HOSTILE = [
    str(PureWindowsPath("C:\\evil\\..\\x")),
    str(PureWindowsPath("..\\..\\x")),
    str(PureWindowsPath("C:\\Windows\\System32")),
    str(PureWindowsPath("\\\\server\\share\\x")),
    "CON",
    "con",
    "nul.txt",
    "NUL",
    "Com1",
    "lpt9.log",
    "aux.tar.gz",
    "prn ",
    "COM¹",
    "report.",
    "report ",
    "a:b",
    "file*.txt",
    "what?",
    'quote"d',
    "pipe|d",
    "<angle>",
]
POSIX_HOSTILE = ["../x", "..", ".", "a/b", "/etc/passwd", "a\x00b", "tab\there", "\x7f", ""]


# --- run ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good", ["a", "0", "run-1", "20261129-091500-tiny-3f9a0c1e", "x_y", "a" * RUN_ID_MAX_LEN]
)
def test_validate_run_id_accepts_safe_ids(good: str) -> None:
    assert validate_run_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        *WINDOWS_HOSTILE,
        *POSIX_HOSTILE,
        "Run-A",  # case-insensitive file systems would merge it with run-a
        "-leading",
        "trailing-",
        "a.b",
        "a;rm -rf",
        "$(whoami)",
        "`id`",
        "a b",
        "ünï",
        "a\u202eb",  # right-to-left override
        "ａ",  # full-width letter
        "run\n",  # "$" in a regex would accept this
        "a" * (RUN_ID_MAX_LEN + 1),
        "con",
        "lpt1",
    ],
)
def test_validate_run_id_refuses_unsafe_ids(bad: str) -> None:
    with pytest.raises(ConfigError, match="run_id") as info:
        validate_run_id(bad)
    assert info.value.field == "run_id"
    assert RUN_ID_RE.pattern in str(info.value)


@pytest.mark.parametrize("not_str", [None, 3, b"run", Path("run")])
def test_validate_run_id_refuses_non_strings(not_str: object) -> None:
    with pytest.raises(ConfigError, match="run_id"):
        validate_run_id(not_str)  # type: ignore[arg-type]


def _outcome(check: Callable[[str], str], text: str) -> str | ConfigError:
    """The checker's result or its ConfigError; any other exception fails the test."""
    try:
        return check(text)
    except ConfigError as exc:
        return exc


@given(st.text())
def test_validate_run_id_total_over_arbitrary_text(text: str) -> None:
    """Either the same string back, or a ConfigError naming run_id; never anything else."""
    outcome = _outcome(validate_run_id, text)
    if isinstance(outcome, ConfigError):
        assert "run_id" in str(outcome)
        assert outcome.field == "run_id"
    else:
        assert outcome == text


@given(st.text(alphabet="abcxyz019-_.CON", max_size=70))
def test_validate_run_id_total_near_the_pattern(text: str) -> None:
    """Same property, with an alphabet that often lands on or near valid ids."""
    outcome = _outcome(validate_run_id, text)
    assert outcome == text if isinstance(outcome, str) else "run_id" in str(outcome)


@given(
    label=st.none() | st.text(),
    now=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.none()
    ),
)
def test_new_run_id_always_validates(label: str | None, now: datetime) -> None:
    run_id = new_run_id(label, now=now)
    assert validate_run_id(run_id) == run_id
    assert run_id.startswith(now.strftime("%Y%m%d-%H%M%S"))
    slug = run_id[len("YYYYmmdd-HHMMSS-") : -len("-0123abcd")]
    assert len(slug) <= 32


def test_new_run_id_slug_and_shape() -> None:
    now = datetime(2026, 11, 29, 9, 15, 0, tzinfo=timezone.utc)
    run_id = new_run_id("Tiny GPT-2 / ../ Ünïcode CON!", now=now)
    prefix, random_part = run_id[:-9], run_id[-8:]
    assert prefix == "20261129-091500-tiny-gpt-2-unicode-con"
    assert len(random_part) == 8
    int(random_part, 16)
    assert new_run_id(None, now=now)[:16] == "20261129-091500-"
    assert len(new_run_id("!!!", now=now)) == len("20261129-091500-0123abcd")
    assert len(new_run_id("x" * 500, now=now)) <= RUN_ID_MAX_LEN


def test_new_run_id_is_unique_and_sortable() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ids = [new_run_id("same", now=start + timedelta(seconds=i // 10)) for i in range(200)]
    assert len(set(ids)) == len(ids)
    by_time = [run_id[:15] for run_id in ids]
    assert by_time == sorted(by_time)


def test_new_run_id_uses_utc_for_aware_datetimes() -> None:
    plus_two = timezone(timedelta(hours=2))
    run_id = new_run_id(now=datetime(2026, 3, 1, 12, 0, 0, tzinfo=plus_two))
    assert run_id.startswith("20260301-100000-")


# --- containment --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "root", "inside"),
    [
        (PureWindowsPath("C:\\runs\\a\\b"), PureWindowsPath("C:\\runs"), True),
        (PureWindowsPath("c:\\RUNS\\a"), PureWindowsPath("C:\\runs"), True),
        (PureWindowsPath("C:\\runs"), PureWindowsPath("C:\\runs"), True),
        (PureWindowsPath("C:\\evil\\..\\x"), PureWindowsPath("C:\\runs"), False),
        (PureWindowsPath("C:\\runs\\..\\evil"), PureWindowsPath("C:\\runs"), False),
        (PureWindowsPath("C:\\runs\\a\\..\\..\\x"), PureWindowsPath("C:\\runs"), False),
        (PureWindowsPath("C:\\runsx\\a"), PureWindowsPath("C:\\runs"), False),
        (PureWindowsPath("D:\\runs\\a"), PureWindowsPath("C:\\runs"), False),
        (PureWindowsPath("..\\..\\x"), PureWindowsPath("C:\\runs"), False),
        (PureWindowsPath("\\\\srv\\share\\runs\\a"), PureWindowsPath("\\\\srv\\share\\runs"), True),
        (PurePosixPath("/runs/a/../b"), PurePosixPath("/runs"), True),
        (PurePosixPath("/runs/../etc"), PurePosixPath("/runs"), False),
        (PurePosixPath("/RUNS/a"), PurePosixPath("/runs"), False),
        (PurePosixPath("relative"), PurePosixPath("/runs"), False),
    ],
)
def test_is_within(path: PureWindowsPath, root: PureWindowsPath, inside: bool) -> None:
    assert is_within(path, root) is inside


def test_resolve_within_accepts_paths_inside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    assert resolve_within(root / "sub" / "x.txt", [root], field="out") == (
        root.resolve() / "sub" / "x.txt"
    )
    assert resolve_within(str(root / "sub" / ".." / "y"), [root], field="out") == (
        root.resolve() / "y"
    )


def test_resolve_within_refuses_escapes_and_names_everything(tmp_path: Path) -> None:
    root, other = tmp_path / "root", tmp_path / "other"
    root.mkdir()
    other.mkdir()
    for escape in [root / ".." / "other", other / "x", Path("/")]:
        with pytest.raises(ConfigError) as info:
            resolve_within(escape, [root], field="notebook.output")
        message = str(info.value)
        assert info.value.field == "notebook.output"
        assert "notebook.output" in message
        assert str(root.resolve()) in message
        assert "outside the allowed folders" in message


def test_resolve_within_follows_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    try:
        (root / "link").symlink_to(outside, target_is_directory=True)
    except OSError:
        pytest.skip("symlinks not permitted here (Windows without developer mode)")
    with pytest.raises(ConfigError, match="outside"):
        resolve_within(root / "link" / "secret", [root], field="path")


def test_resolve_within_several_roots_and_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, runs = tmp_path / "home", tmp_path / "runs"
    home.mkdir()
    runs.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    assert resolve_within("~/nb.ipynb", [runs, home], field="nb") == home.resolve() / "nb.ipynb"


@pytest.mark.parametrize(
    "bad", ["a\x00b", "", "   ", str(PureWindowsPath("..\\..\\x")), "C:\\evil\\..\\x"]
)
def test_resolve_within_refuses_nul_empty_and_foreign_separators(tmp_path: Path, bad: str) -> None:
    if os.name == "nt" and "\\" in bad:
        pytest.skip("backslash is the native separator on Windows")
    with pytest.raises(ConfigError, match="field_x"):
        resolve_within(bad, [tmp_path], field="field_x")


def test_resolve_within_must_exist(tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("x")
    assert resolve_within(tmp_path / "here.txt", [tmp_path], field="f", must_exist=True)
    with pytest.raises(ConfigError, match=r"data\.path: file not found") as info:
        resolve_within(tmp_path / "gone.txt", [tmp_path], field="data.path", must_exist=True)
    assert info.value.field == "data.path"


def test_resolve_within_without_roots(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="none configured"):
        resolve_within(tmp_path, [], field="f")


# --- default dirs -------------------------------------------------------------------------


def test_default_runs_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FOUNDRY_RUNS_DIR", raising=False)
    (tmp_path / "pyproject.toml").write_text("[project]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert default_runs_dir() == tmp_path.absolute() / "runs"
    monkeypatch.setenv("FOUNDRY_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert default_runs_dir() == tmp_path / "elsewhere"
    monkeypatch.setenv("FOUNDRY_RUNS_DIR", "rel")
    assert default_runs_dir() == tmp_path.absolute() / "rel"


def test_one_default_store_for_the_whole_project(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Issue 16: a Lab kernel works in notebooks/, the CLI and the dashboard at the top;
    ``./runs`` gave two stores. The default is the project's runs/ from any folder in it,
    and a stale notebooks/runs store from before does not win over the project."""
    monkeypatch.delenv("FOUNDRY_RUNS_DIR", raising=False)
    project = tmp_path / "proj"
    notebooks = project / "notebooks" / "deep"
    notebooks.mkdir(parents=True)
    (project / ".git").mkdir()
    (project / "notebooks" / "runs").mkdir()
    (project / "notebooks" / "runs" / "foundry.sqlite").write_bytes(b"")
    monkeypatch.chdir(project)
    top = default_runs_dir()
    monkeypatch.chdir(notebooks)
    assert default_runs_dir() == top == project.absolute() / "runs"
    assert find_project_root() == project.absolute()
    # no project marker, only an existing store: that store's folder owns the runs
    alone = tmp_path / "alone"
    (alone / "runs").mkdir(parents=True)
    (alone / "runs" / "foundry.sqlite").write_bytes(b"")
    (alone / "sub").mkdir()
    assert default_runs_dir(alone / "sub") == alone.absolute() / "runs"
    assert runs_dir_for("rel/x") == (notebooks / "rel" / "x").absolute()
    assert runs_dir_for(None) == top


def test_without_a_project_the_store_is_per_user(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("FOUNDRY_RUNS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert find_project_root(bare) is None, "the test folder sits in a project"
    expected = tmp_path / "home" / ".local" / "share" / "foundry" / "runs"
    assert default_runs_dir(bare) == expected
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_runs_dir(bare) == tmp_path / "xdg" / "foundry" / "runs"
    win = _data_dir_for("nt", {"LOCALAPPDATA": r"C:\Users\a\AppData\Local"}, PureWindowsPath("C:/"))
    assert str(win) == r"C:\Users\a\AppData\Local\foundry"


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FOUNDRY_CACHE_DIR")
    assert default_cache_dir().is_absolute()


def test_cache_dir_rules_per_platform() -> None:
    win_home = PureWindowsPath("C:\\Users\\ada")
    local = "C:\\Users\\ada\\AppData\\Local"
    assert _cache_dir_for("nt", {"LOCALAPPDATA": local}, win_home) == PureWindowsPath(
        "C:\\Users\\ada\\AppData\\Local\\foundry\\cache"
    )
    assert _cache_dir_for("nt", {}, win_home) == PureWindowsPath(
        "C:\\Users\\ada\\AppData\\Local\\foundry\\cache"
    )
    assert _cache_dir_for("nt", {"FOUNDRY_CACHE_DIR": "D:\\cache"}, win_home) == (
        PureWindowsPath("D:\\cache")
    )
    posix_home = PurePosixPath("/home/ada")
    assert _cache_dir_for("posix", {}, posix_home) == PurePosixPath("/home/ada/.cache/foundry")
    assert _cache_dir_for("posix", {"XDG_CACHE_HOME": "/xdg"}, posix_home) == PurePosixPath(
        "/xdg/foundry"
    )
    assert _cache_dir_for("posix", {"XDG_CACHE_HOME": "rel"}, posix_home) == PurePosixPath(
        "/home/ada/.cache/foundry"
    )


# --- atomic writes ------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "config.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two ✓\n")
    assert target.read_bytes() == "two ✓\n".encode()
    atomic_write_bytes(target, b"\x00\r\n")
    assert target.read_bytes() == b"\x00\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.bin"]


def test_refusals_quote_huge_values_briefly() -> None:
    """Error messages show a bounded excerpt of what they refuse (pen test, issue 15)."""
    import time

    huge = "/" + "x" * 1_000_000
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        resolve_within(huge, [Path("/nonexistent-root")], field="data.source")
    assert time.perf_counter() - t0 < 1.0
    assert len(str(info.value)) < 600 and "FOUNDRY_ALLOWED_ROOTS" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate_run_id("A" * 1_000_000)
    assert len(str(info.value)) < 600
