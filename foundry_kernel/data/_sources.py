"""Where training text comes from: built-in corpora, local files, JSONL and saved datasets.

Every source is turned into the same thing, a list of ``Document`` in a
deterministic order, so that splitting, tokenizing and caching never depend on
where the text came from. Document ids are stable strings (POSIX-style paths
relative to the source, never absolute or OS-specific), because they key the
split and - through ``corpus_fingerprint`` - the teacher and token caches: the
same corpus must get the same ids on Linux, macOS and Windows.

No network is touched: the built-in corpora come from the running Python
install, and Hugging Face datasets are read only from folders saved with
``save_to_disk``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import tokenize
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from itertools import islice
from pathlib import Path, PurePath
from typing import Any

from foundry_kernel.config import BUILTIN_DATA, DataConfig
from foundry_kernel.errors import ConfigError, DataError
from foundry_kernel.paths import allowed_roots, resolve_within

#: stdlib folders that are not part of the language's documented library (or are huge tests).
STDLIB_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "__pycache__",
    }
)
#: modules whose docstrings add up to less than this are mostly "Return x." noise.
MIN_DOCSTRING_CHARS = 200
GLOB_CHARS = frozenset("*?[")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
ACCEPTED = (
    "'builtin:python-docs', 'builtin:python-stdlib', a text file or glob "
    "(e.g. 'notes.txt', 'data/**/*.md'), a .jsonl file, or a folder saved with "
    "datasets' save_to_disk"
)
_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_NESTED_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


@dataclass(frozen=True)
class Document:
    """One unit of text; the split never cuts a document in two.

    ``text`` is what the loss covers; ``prompt`` (prompt/completion data only)
    conditions the model but carries no loss.
    """

    doc_id: str
    text: str
    prompt: str = ""


# --------------------------------------------------------------------------- public API


def load_documents(cfg: DataConfig, *, check: Callable[[], None] | None = None) -> list[Document]:
    """Read ``cfg.source`` into documents, in a deterministic order, first ``max_documents``.

    Sources are generators, so a small ``max_documents`` stops reading (and, for
    the built-in corpora, parsing) early: quick experiments stay quick. An empty
    result is an error here, where the source can still be named. ``check`` (a run's
    ``ctx.check``) is called after every document: reading and parsing a corpus takes
    seconds (~9 s for the built-in python-docs on a cold, busy machine), and a cancel
    or the step watchdog must reach it.
    """
    documents = islice(_iter_source(cfg), cfg.max_documents)
    if check is None:
        docs = list(documents)
    else:
        docs = []
        check()
        for doc in documents:
            docs.append(doc)
            check()
    if not docs:
        raise DataError(
            f"data.source {cfg.source!r} holds no text (every file, line or row is empty)"
        )
    return docs


def corpus_fingerprint(docs: Sequence[Document]) -> str:
    """SHA-256 over ids, prompts and texts, in order: the key of every corpus-derived cache.

    Each field is length-prefixed so that moving text between fields or documents
    can never produce the same byte stream (and so the same key) by accident.
    """
    digest = hashlib.sha256(b"foundry-corpus-v1\n")
    for doc in docs:
        for part in (doc.doc_id, doc.prompt, doc.text):
            data = part.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


# --------------------------------------------------------------------------- dispatch


def _iter_source(cfg: DataConfig) -> Iterator[Document]:
    """Pick the reader for ``cfg.source`` (and ``cfg.format``), refusing what it can't read."""
    source = cfg.source
    if source == "builtin:python-docs":
        return _iter_python_docs()
    if source == "builtin:python-stdlib":
        return _iter_python_stdlib()
    if source.startswith("builtin:"):
        raise ConfigError(
            f"data.source: unknown built-in corpus {source!r}; choose one of {list(BUILTIN_DATA)}",
            field="data.source",
        )
    _check_field_pair(cfg)
    if has_glob(source):
        return _iter_glob(source, cfg)
    return _iter_path(_existing_path(source), cfg, name=_display_name(source))


def _iter_glob(pattern: str, cfg: DataConfig) -> Iterator[Document]:
    if cfg.format == "hf_dataset":
        raise ConfigError(
            f"data.source: {pattern!r} is a glob, but data.format='hf_dataset' needs one folder",
            field="data.source",
        )
    base, rest = split_glob(PurePath(pattern))
    base_dir = _resolve_local(Path(base).expanduser())
    paths = sorted(p for p in base_dir.glob(rest) if p.is_file())
    if not paths:
        raise DataError(
            f"data.source: the pattern {pattern!r} matches no files "
            f"(looked under {str(base_dir)!r}); check the pattern or the working folder"
        )
    for path in paths:
        name = relative_posix(path, base_dir)
        yield from _iter_path(_resolve_local(path), cfg, name=name)


def _iter_path(path: Path, cfg: DataConfig, *, name: str) -> Iterator[Document]:
    """Read one existing local file or folder according to ``cfg.format``."""
    fmt = cfg.format
    if path.is_dir():
        if fmt in ("auto", "hf_dataset") and is_hf_dataset_dir(path):
            return _iter_hf_dataset(path, cfg, name=name)
        raise ConfigError(_folder_message(path, fmt), field="data.source")
    if fmt == "hf_dataset":
        raise ConfigError(
            f"data.source: {str(path)!r} is a file, but data.format='hf_dataset' needs a folder "
            "saved with datasets' save_to_disk",
            field="data.source",
        )
    if fmt == "jsonl" or (fmt == "auto" and path.suffix.lower() == ".jsonl"):
        return _iter_jsonl(path, cfg, name=name)
    return _iter_text_file(path, name=name, document_chars=cfg.document_chars)


def _folder_message(path: Path, fmt: str) -> str:
    if fmt == "hf_dataset":
        return (
            f"data.source: {str(path)!r} is not a saved Hugging Face dataset "
            f"(none of {list(HF_MARKERS)} in it); save one with Dataset.save_to_disk"
        )
    return (
        f"data.source: {str(path)!r} is a folder; to read its text files use a glob such as "
        f"'{PurePath(path.name, '**', '*.txt').as_posix()}', or point at a folder saved with "
        "datasets' save_to_disk"
    )


def check_local_source(source: str) -> None:
    """Refuse a ``data.source`` that names no existing file, folder or glob folder.

    What loading would refuse, asked before a run starts (the panel's form checks it on
    every change, so a typo shows beside the field instead of after Start). Built-ins
    pass: their names are checked by the config.
    """
    if source.startswith("builtin:"):
        return
    if not has_glob(source):
        _existing_path(source)
        return
    base, _rest = split_glob(PurePath(source))
    folder = _resolve_local(Path(base).expanduser())
    if not folder.is_dir():
        raise ConfigError(
            f"data.source: the pattern {source!r} looks under {str(folder)!r}, which is not "
            "an existing folder; check the pattern or the working folder",
            field="data.source",
        )


def _existing_path(source: str) -> Path:
    path = _resolve_local(Path(source).expanduser())
    if not path.exists():
        raise ConfigError(
            f"data.source: {source!r} is not a built-in corpus and no such file or folder "
            f"exists. Accepted: {ACCEPTED}.",
            field="data.source",
        )
    return path


def _resolve_local(path: Path) -> Path:
    """THE single place local data paths pass through the project's path policy.

    Every local file or folder this module opens (a single source, a glob's
    folder and each file it matches) goes through here, so a config cannot read
    outside the allowed roots (see ``paths.allowed_roots``).
    """
    return resolve_within(path, allowed_roots(), field="data.source")


def _check_field_pair(cfg: DataConfig) -> None:
    """A prompt without a completion (or the reverse) is a config mistake, not data."""
    if (cfg.prompt_field is None) != (cfg.completion_field is None):
        missing = "data.completion_field" if cfg.completion_field is None else "data.prompt_field"
        raise ConfigError(
            f"{missing}: set data.prompt_field and data.completion_field together "
            "(or neither, to read plain text from data.text_field)",
            field=missing,
        )


# --------------------------------------------------------------------------- path helpers


def has_glob(source: str) -> bool:
    """Whether ``source`` is a glob pattern rather than one path."""
    return any(ch in GLOB_CHARS for ch in source)


def split_glob(pattern: PurePath) -> tuple[PurePath, str]:
    """Split a glob into the literal folder to search and the pattern below it.

    Works on any path flavour (``PureWindowsPath('C:\\\\d\\\\**\\\\*.md')`` gives
    ``('C:\\\\d', '**/*.md')``); the remainder uses '/', which pathlib's glob
    accepts on every OS.
    """
    parts = pattern.parts
    first = next(i for i, part in enumerate(parts) if has_glob(part))
    base = type(pattern)(*parts[:first]) if first else type(pattern)(".")
    return base, "/".join(parts[first:])


def relative_posix(path: PurePath, base: PurePath) -> str:
    """``path`` relative to ``base`` with '/' separators: OS-independent document ids."""
    return path.relative_to(base).as_posix()


def _display_name(source: str) -> str:
    """The file or folder name used in ids of a single-path source (never its full path)."""
    return PurePath(source).name or source


def is_hf_dataset_dir(path: Path) -> bool:
    """A folder written by ``save_to_disk`` (Dataset or DatasetDict)."""
    return any((path / marker).is_file() for marker in HF_MARKERS)


# --------------------------------------------------------------------------- local files


def _iter_text_file(path: Path, *, name: str, document_chars: int | None) -> Iterator[Document]:
    """One document per file; a file longer than ``document_chars`` is cut into parts
    (``file:<name>#<n>``) at paragraph breaks. Why: the split holds out whole documents,
    so a corpus that is one large file could not be split at all ("use a larger corpus"
    for 600 KB of text). Parts of one file that share a passage are still kept on one side
    of the split by its overlap check."""
    text = _read_utf8(path)
    if not text.strip():  # an empty file has nothing to learn from
        return
    if document_chars is None or len(text) <= document_chars:
        yield Document(doc_id=f"file:{name}", text=text)
        return
    for n, part in enumerate(cut_text(text, document_chars)):
        yield Document(doc_id=f"file:{name}#{n:05d}", text=part)


def cut_text(text: str, limit: int) -> Iterator[str]:
    """``text`` in consecutive parts of at most ``limit`` characters that join back into
    it exactly; each cut at the last paragraph break (a blank line) before the limit, else
    the last line break, else the last space, else at the limit itself. Parts of nothing
    but whitespace are dropped."""
    start = 0
    while len(text) - start > limit:
        window = text[start : start + limit]
        cut = -1
        for sep in ("\n\n", "\n", " "):
            at = window.rfind(sep)
            if at > limit // 4:  # a cut that keeps most of the window
                cut = at + len(sep)
                break
        end = start + (cut if cut > 0 else limit)
        if text[start:end].strip():
            yield text[start:end]
        start = end
    if text[start:].strip():
        yield text[start:]


def _read_utf8(path: Path) -> str:
    """Strict UTF-8 (a BOM is dropped) with newlines normalised, so ids and hashes match
    between a checkout with LF and one with CRLF line endings."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
            "convert it to UTF-8 or leave it out of data.source"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    return normalize_newlines(text)


def normalize_newlines(text: str) -> str:
    """CRLF and CR become LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _iter_jsonl(path: Path, cfg: DataConfig, *, name: str) -> Iterator[Document]:
    """One JSON object per line; blank lines are allowed, anything else must parse."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{str(path)!r} line {lineno}"
            record = _parse_jsonl_line(raw, where)
            if record is None:
                continue
            doc = record_to_document(record, cfg, doc_id=f"file:{name}#{lineno}", where=where)
            if doc is not None:
                yield doc


def _parse_jsonl_line(raw: bytes, where: str) -> dict[str, Any] | None:
    try:
        line = raw.decode("utf-8-sig" if raw.startswith(b"\xef\xbb\xbf") else "utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 (byte {exc.start}: {exc.reason})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def record_to_document(
    record: Mapping[str, Any], cfg: DataConfig, *, doc_id: str, where: str
) -> Document | None:
    """Apply the field semantics shared by JSONL and datasets; None for an empty text.

    Empty texts are dropped rather than refused: they carry no loss, and datasets
    often contain a few.
    """
    if cfg.prompt_field is not None and cfg.completion_field is not None:
        prompt = _string_field(record, cfg.prompt_field, "data.prompt_field", where)
        text = _string_field(record, cfg.completion_field, "data.completion_field", where)
    else:
        prompt, text = "", _string_field(record, cfg.text_field, "data.text_field", where)
    if not text:
        return None
    return Document(doc_id=doc_id, text=normalize_newlines(text), prompt=normalize_newlines(prompt))


def _string_field(record: Mapping[str, Any], field: str, setting: str, where: str) -> str:
    if field not in record:
        raise DataError(f"{where}: no field {field!r} ({setting}); keys present: {sorted(record)}")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} ({setting}) must be a string, got {type(value).__name__}"
        )
    return value


# --------------------------------------------------------------------------- HF datasets


def _iter_hf_dataset(path: Path, cfg: DataConfig, *, name: str) -> Iterator[Document]:
    """Rows of a ``save_to_disk`` folder: its 'train' split, or its only split."""
    dataset, split = _load_hf_split(path)
    fields = _hf_fields(cfg)
    missing = [f for f in fields if f not in dataset.column_names]
    if missing:
        setting = _field_setting(cfg, missing[0])
        raise DataError(
            f"dataset {str(path)!r} (split {split!r}) has no column {missing[0]!r} ({setting}); "
            f"columns present: {sorted(dataset.column_names)}"
        )
    for index, row in enumerate(dataset.select_columns(fields)):
        where = f"dataset {str(path)!r} split {split!r} row {index}"
        doc = record_to_document(row, cfg, doc_id=f"hf:{name}/{split}#{index}", where=where)
        if doc is not None:
            yield doc


def _load_hf_split(path: Path) -> tuple[Any, str]:
    import datasets  # imported here: it is slow to import and only this source needs it

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"cannot load the saved dataset {str(path)!r}: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        if "train" in loaded:
            return loaded["train"], "train"
        if len(splits) == 1:
            return loaded[splits[0]], splits[0]
        raise DataError(
            f"dataset {str(path)!r} has splits {splits} and none is 'train'; "
            "save the split to train on by itself, or name one 'train'"
        )
    return loaded, "train"


def _hf_fields(cfg: DataConfig) -> list[str]:
    if cfg.prompt_field is not None and cfg.completion_field is not None:
        return [cfg.prompt_field, cfg.completion_field]
    return [cfg.text_field]


def _field_setting(cfg: DataConfig, field: str) -> str:
    if field == cfg.prompt_field:
        return "data.prompt_field"
    if field == cfg.completion_field:
        return "data.completion_field"
    return "data.text_field"


# --------------------------------------------------------------------------- built-in corpora


def _iter_python_docs() -> Iterator[Document]:
    """Every pydoc topic, then every stdlib module's docstrings (~0.47 + ~1.6 MB of prose)."""
    yield from _iter_pydoc_topics()
    yield from _iter_stdlib(_docstring_document)


def _iter_python_stdlib() -> Iterator[Document]:
    """The stdlib's own source code, one document per ``.py`` file (~11 MB)."""
    yield from _iter_stdlib(_source_document)


def _iter_pydoc_topics() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds leave pydoc_data out
        raise DataError(
            "this Python install has no pydoc_data, so 'builtin:python-docs' is unavailable; "
            "use 'builtin:python-stdlib' or a local corpus"
        ) from None
    for key in sorted(topics):
        yield Document(doc_id=f"pydoc:{key}", text=normalize_newlines(topics[key]))


def _iter_stdlib(make: Callable[[Path, str], Document | None]) -> Iterator[Document]:
    """Apply ``make`` to every stdlib file; files are cached per process (they never change)."""
    root = stdlib_root()
    for rel in stdlib_files(str(root)):
        doc = _cached_document(make, root, rel)
        if doc is not None:
            yield doc


def stdlib_root() -> Path:
    """The running Python's standard-library source folder."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(
            f"the standard library's source folder {str(root)!r} does not exist (a zipped or "
            "frozen Python?); the built-in corpora need it - use a local corpus instead"
        )
    return root


@lru_cache(maxsize=4)
def stdlib_files(root: str) -> tuple[str, ...]:
    """Sorted POSIX paths (relative to ``root``) of the stdlib's ``.py`` files, skips applied.

    Sorting the relative POSIX strings (not OS paths) gives the same order on every OS.
    """
    found: list[str] = []
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        found.extend(
            relative_posix(PurePath(folder, name), PurePath(root))
            for name in filenames
            if name.endswith(".py")
        )
    return tuple(sorted(found))


@lru_cache(maxsize=8192)
def _cached_document(
    make: Callable[[Path, str], Document | None], root: Path, rel: str
) -> Document | None:
    """Parsing the whole stdlib costs ~2 s; notebooks and tests load it more than once."""
    return make(root, rel)


def _docstring_document(root: Path, rel: str) -> Document | None:
    tree = _parse_module(_read_source(root / rel))
    if tree is None:
        return None
    text = "\n\n".join(collect_docstrings(tree))
    if len(text) < MIN_DOCSTRING_CHARS:
        return None
    return Document(doc_id=f"doc:{rel}", text=text)


def _source_document(root: Path, rel: str) -> Document | None:
    text = _decode_source(_read_source(root / rel))
    if not text or not text.strip():
        return None
    return Document(doc_id=f"src:{rel}", text=text)


def _read_source(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # unreadable stdlib file: the corpus simply leaves it out
        return b""


def _decode_source(raw: bytes) -> str | None:
    """Decode with the file's own coding cookie (PEP 263); None if it doesn't decode."""
    try:
        encoding, _ = tokenize.detect_encoding(BytesIO(raw).readline)
        return normalize_newlines(raw.decode(encoding))
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


def _parse_module(raw: bytes) -> ast.Module | None:
    """Parse a source file, or None for the few that don't parse on this Python."""
    if not raw:
        return None
    with warnings.catch_warnings():  # invalid escape sequences etc. are not our business
        warnings.simplefilter("ignore")
        try:
            return ast.parse(raw)
        except (SyntaxError, ValueError, RecursionError):
            return None


def collect_docstrings(tree: ast.AST) -> list[str]:
    """Module, class and function docstrings in source order.

    Only statement bodies are visited (not every expression, as ``ast.walk``
    would), which is both faster and keeps the prose in reading order.
    """
    found: list[str] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCSTRING_OWNERS):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(normalize_newlines(doc))
        children: list[ast.AST] = []
        for name in _NESTED_BODIES:
            children.extend(getattr(node, name, None) or ())
        stack.extend(reversed(children))
    return found


__all__ = [
    "ACCEPTED",
    "Document",
    "collect_docstrings",
    "corpus_fingerprint",
    "has_glob",
    "is_hf_dataset_dir",
    "load_documents",
    "record_to_document",
    "relative_posix",
    "split_glob",
    "stdlib_files",
    "stdlib_root",
]
