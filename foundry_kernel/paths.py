"""Run ids, user-given file names and path containment, safe on Linux, macOS and Windows.

Run ids become folder names, notebook output names become file names, and paths typed
into a widget are opened by the kernel. Each of those is a place where ``..``, a drive
letter, a Windows device name (``CON``, ``nul.txt``) or a stray control character could
write outside the runs directory or produce a file that another OS cannot open. This
module is the single place that decides what is allowed, so the rules are the same
everywhere and every refusal is a :class:`~foundry_kernel.errors.ConfigError` that names
the field at fault.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import re
import secrets
import tempfile
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

from foundry_kernel.errors import ConfigError
from foundry_kernel.plaindata import brief

__all__ = [
    "RUN_ID_MAX_LEN",
    "RUN_ID_RE",
    "WINDOWS_RESERVED_NAMES",
    "default_cache_dir",
    "default_runs_dir",
    "find_project_root",
    "is_within",
    "new_run_id",
    "resolve_within",
    "runs_dir_for",
    "validate_run_id",
]

RUN_ID_MAX_LEN = 64
"""Short enough to leave room for the runs dir and file names under Windows' MAX_PATH."""

# Lowercase only: Windows and macOS file systems are case-insensitive, so "Run-A" and
# "run-a" would silently share a folder. No dots at all: that rules out "..", trailing
# dots (which Windows strips) and "nul.txt"-style device names in one go. ASCII ranges
# only and no re.IGNORECASE, which would let e.g. the Kelvin sign match "k".
RUN_ID_RE = re.compile(rf"[a-z0-9](?:[a-z0-9_-]{{0,{RUN_ID_MAX_LEN - 2}}}[a-z0-9])?")

_SLUG_MAX_LEN = 32

WINDOWS_RESERVED_NAMES: frozenset[str] = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{dev}{n}" for dev in ("COM", "LPT") for n in (*"0123456789", "¹", "²", "³")}
)
"""Device names Windows reserves in every folder, with or without an extension."""

# Characters Windows refuses in file names, plus both separators whatever the host OS.
_FORBIDDEN_FILENAME_CHARS = frozenset('<>:"/\\|?*')
_FILENAME_MAX_BYTES = 255  # NAME_MAX on Linux/macOS; Windows allows 255 UTF-16 units


def _describe(value: object, limit: int = 80) -> str:
    """Quote a rejected value for an error message without flooding it (``plaindata.brief``:
    bounded work too, whatever the value holds)."""
    return brief(value, limit)


def _is_reserved_windows_name(name: str) -> bool:
    """Windows treats ``nul``, ``NUL.txt`` and ``nul .tar.gz`` all as the NUL device."""
    stem = name.split(".", 1)[0].rstrip(" ")
    return stem.upper() in WINDOWS_RESERVED_NAMES


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` unchanged if it is a safe run id, else raise ``ConfigError``.

    Run ids arrive from URLs, notebook parameters and other processes and are joined
    onto the runs directory, so anything outside :data:`RUN_ID_RE` is refused rather
    than cleaned up: silently rewriting an id would point at a different run.
    """
    if not isinstance(run_id, str):
        raise ConfigError(f"run_id must be a string, got {type(run_id).__name__}", field="run_id")
    if RUN_ID_RE.fullmatch(run_id) is None or _is_reserved_windows_name(run_id):
        raise ConfigError(
            f"run_id {_describe(run_id)} is not a valid run id: it must match "
            f"{RUN_ID_RE.pattern!r} (1-{RUN_ID_MAX_LEN} lowercase ASCII letters, digits, "
            "'-' or '_', starting and ending with a letter or digit) and must not be a "
            "Windows device name such as 'con' or 'nul'",
            field="run_id",
        )
    return run_id


def _slugify(label: str) -> str:
    """Reduce a free-text label to ``[a-z0-9-]``, keeping it readable where possible."""
    ascii_text = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:_SLUG_MAX_LEN].rstrip("-")


def new_run_id(label: str | None = None, *, now: datetime | None = None) -> str:
    """Allocate a fresh run id such as ``20261129-091500-tiny-gpt2-3f9a0c1e``.

    The UTC timestamp makes ids sort by creation time (to the second, unaffected by
    daylight-saving changes); the label slug makes folders recognisable; 32 random bits
    make two runs started in the same second by different kernels distinct. An aware
    ``now`` is converted to UTC; a naive one is used as given.
    """
    moment = datetime.now(timezone.utc) if now is None else now
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    parts = [moment.strftime("%Y%m%d-%H%M%S")]
    slug = _slugify(label) if label else ""
    if slug:
        parts.append(slug)
    parts.append(secrets.token_hex(4))
    return validate_run_id("-".join(parts))


def _refuse_filename(name: str, field: str, why: str) -> ConfigError:
    return ConfigError(
        f"{field}: {_describe(name)} cannot be used as a file name: {why}", field=field
    )


def _normpath(path: PurePath) -> PurePath:
    """Collapse ``.`` and ``..`` lexically with the rules of the path's own flavour."""
    module = ntpath if isinstance(path, PureWindowsPath) else posixpath
    return type(path)(module.normpath(str(path)))


def is_within(path: PurePath, root: PurePath) -> bool:
    """Whether ``path`` is ``root`` or below it, after collapsing ``..`` lexically.

    Pure (no file-system access), so it judges Windows paths correctly on any host,
    case-insensitively for Windows. Symlinks are *not* followed: callers that touch the
    disk should use :func:`resolve_within`, which resolves first.
    """
    if not isinstance(path, type(root)):
        path = type(root)(str(path))
    norm_path, norm_root = _normpath(path), _normpath(root)
    if not norm_path.is_absolute() or not norm_root.is_absolute():
        return False
    return norm_path == norm_root or norm_path.is_relative_to(norm_root)


def _outside_error(field: str, path: object, roots: Sequence[Path]) -> ConfigError:
    allowed = ", ".join(str(root) for root in roots) or "(none configured)"
    return ConfigError(
        f"{field}: {_describe(str(path), 200)} is outside the allowed folders: {allowed} "
        "(to allow another folder, add it to FOUNDRY_ALLOWED_ROOTS)",
        field=field,
    )


def _resolve(path: Path, field: str) -> Path:
    """``expanduser`` + ``resolve`` with their failures turned into a ``ConfigError``."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # no home dir, symlink loop, permission
        raise ConfigError(f"{field}: cannot resolve {str(path)!r}: {exc}", field=field) from exc


def resolve_within(
    path: str | Path,
    roots: Sequence[Path],
    *,
    field: str,
    must_exist: bool = False,
) -> Path:
    """Resolve ``path`` (``~`` expanded, symlinks followed) and insist it lies in a root.

    Relative paths are taken from the current directory, as everywhere in Python; join
    them onto a root first if that is what is meant. Symlinks are resolved *before* the
    check so a link inside a root cannot smuggle access outside it (a link swapped in
    after the check is out of scope). Backslashes are refused on POSIX hosts because a
    path like ``..\\..\\x`` written on Windows would otherwise become an odd file name
    here instead of the escape it was on Windows.
    """
    text = str(path)
    if "\x00" in text:
        raise ConfigError(f"{field}: path contains a NUL byte: {_describe(text)}", field=field)
    if not text.strip():
        raise ConfigError(f"{field}: path is empty", field=field)
    if os.name != "nt" and "\\" in text:
        raise ConfigError(
            f"{field}: {_describe(text)} contains a backslash; use '/' as the separator",
            field=field,
        )
    if not roots:
        raise _outside_error(field, path, roots)
    resolved = _resolve(Path(text), field)
    resolved_roots = [_resolve(Path(root), field) for root in roots]
    if not any(is_within(resolved, root) for root in resolved_roots):
        raise _outside_error(field, path, resolved_roots)
    if must_exist and not resolved.exists():
        raise ConfigError(f"{field}: file not found: {resolved}", field=field)
    return resolved


PROJECT_MARKERS = ("pyproject.toml", ".git")
"""What makes a folder a project: its ``runs/`` is the store of everything started in it."""
STORE_MARKER = ("runs", "foundry.sqlite")
"""An existing store (``runs/foundry.sqlite``) also marks the folder that owns it."""


def find_project_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (the working folder) that is a project.

    A folder with a project marker (``pyproject.toml``, ``.git``) wins over one that only
    holds an existing store, so a stray ``notebooks/runs`` from an older version does not
    keep splitting the runs of one project. None when neither is found up to the root.
    """
    here = (start or Path.cwd()).absolute()
    chain = [here, *here.parents]
    for folder in chain:
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    for folder in chain:
        if folder.joinpath(*STORE_MARKER).is_file():
            return folder
    return None


def _data_dir_for(os_name: str, environ: Mapping[str, str], home: PurePath) -> PurePath:
    """Platform rule for the per-user data folder, pure so tests can check Windows too."""
    flavour: type[PurePath] = PureWindowsPath if os_name == "nt" else PurePosixPath
    if os_name == "nt":
        local = environ.get("LOCALAPPDATA", "").strip()
        base = flavour(local) if local else flavour(home) / "AppData" / "Local"
        return base / "foundry"
    xdg = environ.get("XDG_DATA_HOME", "").strip()
    base = flavour(xdg) if xdg and flavour(xdg).is_absolute() else flavour(home) / ".local/share"
    return base / "foundry"


def default_runs_dir(start: Path | None = None) -> Path:
    """The one store every entry point uses unless told otherwise (absolute).

    ``$FOUNDRY_RUNS_DIR`` if set; else ``runs/`` of the project the working folder is in
    (:func:`find_project_root`), so a JupyterLab kernel in ``notebooks/``, the CLI at the
    project's top and the dashboard all agree; else a per-user folder
    (``~/.local/share/foundry/runs``, ``%LOCALAPPDATA%\\foundry\\runs``), the same from
    any folder. A config's ``runs_dir`` (or ``--runs-dir``) overrides this. Made absolute
    at call time so a later ``os.chdir`` in a notebook cannot move it.
    """
    configured = os.environ.get("FOUNDRY_RUNS_DIR", "").strip()
    if configured:
        return Path(configured).expanduser().absolute()
    project = find_project_root(start)
    if project is not None:
        return project / "runs"
    try:
        home = Path.home()
    except RuntimeError as exc:
        raise ConfigError(
            "no project folder (pyproject.toml, .git) above the working folder and no home "
            "folder for the per-user store; set runs_dir or FOUNDRY_RUNS_DIR",
            field="runs_dir",
        ) from exc
    return Path(_data_dir_for(os.name, os.environ, home)).expanduser() / "runs"


def runs_dir_for(configured: str | os.PathLike[str] | None) -> Path:
    """The store a run with this ``runs_dir`` setting lands in (what gets printed)."""
    if configured is None or not str(configured).strip():
        return default_runs_dir()
    return Path(configured).expanduser().absolute()


def _cache_dir_for(os_name: str, environ: Mapping[str, str], home: PurePath) -> PurePath:
    """Platform rule for the cache dir, pure so tests can check Windows on any host."""
    configured = environ.get("FOUNDRY_CACHE_DIR", "").strip()
    flavour: type[PurePath] = PureWindowsPath if os_name == "nt" else PurePosixPath
    if configured:
        return flavour(configured)
    if os_name == "nt":
        local = environ.get("LOCALAPPDATA", "").strip()
        base = flavour(local) if local else flavour(home) / "AppData" / "Local"
        return base / "foundry" / "cache"
    xdg = environ.get("XDG_CACHE_HOME", "").strip()
    base = flavour(xdg) if xdg and flavour(xdg).is_absolute() else flavour(home) / ".cache"
    return base / "foundry"


def default_cache_dir() -> Path:
    """``$FOUNDRY_CACHE_DIR``, else ``%LOCALAPPDATA%\\foundry\\cache`` / ``~/.cache/foundry``.

    ``$XDG_CACHE_HOME`` is honoured on POSIX, as other tools on the machine do.
    """
    try:
        home = Path.home()
    except RuntimeError as exc:
        raise ConfigError(
            "cannot find the home directory; set FOUNDRY_CACHE_DIR", field="FOUNDRY_CACHE_DIR"
        ) from exc
    return Path(_cache_dir_for(os.name, os.environ, home)).expanduser()


def allowed_roots() -> list[Path]:
    """Folders that data, model and config paths may point into.

    The working folder, the home folder, Foundry's cache and runs folders and the
    system temp folder, plus any listed in ``FOUNDRY_ALLOWED_ROOTS`` (separated by
    ``os.pathsep``). The policy lives in the environment, not in the config, so a
    config or notebook parameter cannot widen its own access.
    """
    roots = [Path.cwd(), Path.home(), default_cache_dir(), default_runs_dir()]
    roots.append(Path(tempfile.gettempdir()))
    extra = os.environ.get("FOUNDRY_ALLOWED_ROOTS", "")
    roots += [Path(p).expanduser() for p in extra.split(os.pathsep) if p.strip()]
    return roots
