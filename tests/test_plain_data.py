"""Plain data only, from every YAML/JSON/command-line entry (pen test, issue 15, #2 and #3).

A YAML alias bomb (nine levels of nine aliases: a few hundred bytes, 9**9 values once
walked) used to take 23 s and 0.9 GB at depth 8 and ran past 300 s at depth 9, in the
config schema and in an error message that ``repr()``'d the whole value. Each entry now
refuses it at the first anchor; the tests time that through the real entry points.
"""

from __future__ import annotations

import importlib
import json
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foundry_kernel.cli import main as cli_main
from foundry_kernel.config import load_config, parse_override, validate_config
from foundry_kernel.errors import ConfigError
from foundry_kernel.plaindata import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_VALUE_CHARS,
    brief,
    check_plain,
    parse_plain_json,
)
from widgets import runner as notebook_runner
from widgets.resources import shipped_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = shipped_notebook("distill")
BOMB_DEPTH = 10


def alias_bomb_lines(depth: int) -> list[str]:
    """``depth`` levels of nine aliases to the level below (9**depth leaves)."""
    lines = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth + 1)]
    return lines


def bomb_file(depth: int, field: str) -> str:
    """A config/params file: the levels under one key, the last level under ``field``."""
    lines = alias_bomb_lines(depth)
    levels = "\n".join(f"  - {line}" for line in lines[:-1])
    return f"levels:\n{levels}\n{field}: {lines[-1]}\n"


def bomb_value(depth: int) -> str:
    """One flow value (a ``--set`` / ``-p`` value): each element anchors the next level."""
    return "[" + ", ".join(alias_bomb_lines(depth)) + "]"


def _timed(call: Callable[[], int]) -> tuple[int, float, int]:
    """Exit code, seconds and peak traced memory (bytes) of one refusal."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        code = call()
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return code, seconds, peak


def _report(what: str, seconds: float, peak: int, size: int) -> None:
    print(f"\n{what}: {size} bytes of YAML refused in {seconds * 1000:.1f} ms, {peak / 1e6:.2f} MB")


@pytest.mark.parametrize(
    "entry", ["config file", "--set value", "foundry run -f file", "foundry run -p value"]
)
def test_a_depth_10_alias_bomb_is_refused_in_under_a_second(
    entry: str, tmp_path: Path, runs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    value = bomb_value(BOMB_DEPTH)
    if entry == "config file":
        path = tmp_path / "bomb.yaml"
        text = bomb_file(BOMB_DEPTH, "eval")
        path.write_text(text, encoding="utf-8")
        argv = ["distill", "--config", str(path)]
    elif entry == "--set value":
        text = value
        argv = ["distill", "--set", f"eval.sample_prompts={value}"]
    elif entry == "foundry run -f file":
        path = tmp_path / "bomb-params.yaml"
        text = bomb_file(BOMB_DEPTH, "headless")
        path.write_text(text, encoding="utf-8")
        argv = ["run", str(NOTEBOOK), "-f", str(path), "--runs-dir", str(runs_dir)]
    else:
        text = value
        argv = ["run", str(NOTEBOOK), "-p", "headless", value, "--runs-dir", str(runs_dir)]
    for module in ("foundry_kernel.run._control", "papermill.inspection"):
        importlib.import_module(module)  # imports are not the refusal being timed

    code, seconds, peak = _timed(lambda: cli_main(argv))
    err = capsys.readouterr().err
    _report(entry, seconds, peak, len(text.encode()))
    assert code == 2, err
    assert "YAML anchor &a0" in err and "not allowed" in err
    assert "Traceback" not in err and len(err) < 1000
    assert seconds < 1.0
    assert peak < 20e6
    assert not (runs_dir / "foundry.sqlite").exists()


def test_an_error_message_never_builds_the_whole_value() -> None:
    """The same bomb built in Python (no YAML to refuse) is described in bounded time."""
    bomb: Any = ["x"]
    for _ in range(9):
        bomb = [bomb] * 9
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"data\.text_field") as info:
        validate_config({"data": {"text_field": bomb}})
    assert time.perf_counter() - t0 < 1.0
    assert len(str(info.value)) < 300
    assert len(brief(bomb)) <= 80 and len(brief("y" * 10**6, 200)) <= 200


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("config file", "larger than 65,536 bytes"),
        ("params file", "larger than 65,536 bytes"),
        ("--set value", f"at most {MAX_VALUE_CHARS:,}"),
        ("-p value", f"at most {MAX_VALUE_CHARS:,}"),
        ("--grid value", f"at most {MAX_VALUE_CHARS:,}"),
    ],
)
def test_input_sizes_are_capped(
    entry: str,
    fragment: str,
    tmp_path: Path,
    runs_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    big_file = tmp_path / "big.yaml"
    big_file.write_text("# padding\n" * (MAX_FILE_BYTES // 10 + 1), encoding="utf-8")
    long = "x" * (MAX_VALUE_CHARS + 1)
    run = ["run", str(NOTEBOOK), "--runs-dir", str(runs_dir)]
    argv = {
        "config file": ["distill", "--config", str(big_file)],
        "params file": [*run, "-f", str(big_file)],
        "--set value": ["distill", "--set", f"data.text_field={long}"],
        "-p value": [*run, "-p", "headless", long],
        "--grid value": [*run, "--grid", f"seed=1,{long}"],
    }[entry]
    t0 = time.perf_counter()
    assert cli_main(argv) == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("data:\n  text_field: !!binary aGVsbG8=\n", "YAML tag !!binary (line 2, column 15)"),
        ("eval:\n  sample_prompts: !!set {a: null}\n", "YAML tag !!set"),
        ("name: !!timestamp 2026-11-29\n", "YAML tag !!timestamp"),
        ("name: !!python/object/apply:os.system [id]\n", "YAML tag !!python/object/apply"),
        ("name: !custom x\n", "YAML tag !custom"),
        ("loss: {beta: .nan}\n", "loss.beta: nan is not a finite number"),
        ("limits: {timeout_s: .inf}\n", "limits.timeout_s: inf is not a finite number"),
        ("loss: {beta: 0.5}\nloss: {kind: jsd}\n", "the key 'loss' is given twice (line 2"),
        ('data: {source: "a\\0b"}\n', "data.source: 'a\\x00b' contains a NUL byte"),
        ("a: " + "[" * 40 + "]" * 40 + "\n", f"nesting deeper than {MAX_DEPTH}"),
        ("seed: 1" + "0" * 5000 + "\n", "more than 4300 digits"),
    ],
)
def test_a_config_file_must_be_plain_data(text: str, fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value) or "NUL" in str(info.value)


def test_a_json_config_must_be_plain_data(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"loss": {"beta": NaN}}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"loss\.beta: nan is not a finite number"):
        load_config(path)
    path.write_text("[" * 5000 + "]" * 5000, encoding="utf-8")
    with pytest.raises(ConfigError, match="nesting deeper"):
        load_config(path)
    path.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.text_field=!!binary aGVsbG8=", "YAML tag !!binary"),
        ("eval.sample_prompts=!!set {a: null}", "YAML tag !!set"),
        ("eval.sample_prompts=[&a x, *a]", "YAML anchor &a"),
        ("data.text_field=*a", "YAML alias *a"),
        ("loss.beta=.nan", "not a finite number"),
    ],
)
def test_set_values_must_be_plain_data(override: str, fragment: str) -> None:
    """The config schema coerced bytes from !!binary to text: a tag passed it unnoticed."""
    with pytest.raises(ConfigError) as info:
        parse_override(override)
    assert fragment in str(info.value) and info.value.field == override.split("=")[0]


def test_unquoted_dates_stay_text_and_yaml_errors_stay_text() -> None:
    assert parse_override("name=2026-11-29") == ("name", "2026-11-29")
    assert parse_override("data.source=a: b: c") == ("data.source", "a: b: c")  # not YAML
    assert parse_override("name==") == ("name", "=")


# --------------------------------------------------------------------------- fuzz

TAGS = [
    "!!binary",
    "!!set",
    "!!timestamp",
    "!!omap",
    "!!pairs",
    "!!python/object/apply:os.system",
    "!!python/name:os.system",
    "!!python/tuple",
    "!!python/bytes",
    "!custom",
    "!<tag:example.com,2026:x>",
    "!!str",
    "!!int",
    "!!float",
    "!!bool",
    "!!null",
    "!!seq",
    "!!map",
    "!",
]
NASTY = [
    '"+str(__import__("pathlib").Path("CANARY").write_text("x"))+"',
    "'+str(__import__('os').getpid())+'",
    '"',
    "'",
    "\\",
    '\\"',
    '"""',
    "'''",
    "\n",
    "\r\n",
    "\\n",
    "\x00",
    "\u2028",
    "#",
    "{run_id}",
    "${HOME}",
    "aGVsbG8=",
    "2026-11-29",
    "=",
    "<<",
    "1e400",
    ".nan",
]
TEXT = st.one_of(st.sampled_from(NASTY), st.text(max_size=12))


def _scalar_yaml(text: str) -> st.SearchStrategy[str]:
    """One text in several YAML spellings (some of them not YAML at all)."""
    return st.sampled_from(
        [json.dumps(text), "'" + text.replace("'", "''") + "'", text, yaml.safe_dump(text)[:-5]]
    )


SCALAR = st.one_of(
    TEXT.flatmap(_scalar_yaml),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(["true", "no", "null", "~", ".inf", "-.nan", "0x1F", "0o17", "1_000"]),
)


def _node(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    seq = st.lists(children, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")
    keys = st.one_of(TEXT.map(json.dumps), st.integers().map(str), st.sampled_from(["a", "b"]))
    pair = st.tuples(keys, children).map(lambda kv: f"{kv[0]}: {kv[1]}")
    mapping = st.lists(pair, max_size=4).map(lambda xs: "{" + ", ".join(xs) + "}")
    tagged = st.tuples(st.sampled_from(TAGS), children).map(lambda tv: f"{tv[0]} {tv[1]}")
    anchored = st.tuples(st.sampled_from(["a", "b"]), children).map(lambda av: f"&{av[0]} {av[1]}")
    alias = st.sampled_from(["*a", "*b"])
    return st.one_of(seq, mapping, tagged, anchored, alias)


YAML_VALUE = st.recursive(SCALAR, _node, max_leaves=12)


@pytest.fixture(scope="module")
def distill() -> tuple[Any, notebook_runner.Declared]:
    from papermill.iorw import load_notebook_node

    return load_notebook_node(str(NOTEBOOK)), notebook_runner.declared_parameters(NOTEBOOK)


def _through_the_runner(
    pairs: list[list[str]], files: list[Path], distill: tuple[Any, notebook_runner.Declared]
) -> None:
    """What ``foundry run`` does with these arguments up to the kernel, checked: refused
    with a bounded message, or every value written as exactly its literal."""
    nb, declared = distill
    try:
        sets = notebook_runner.parameter_sets(pairs, files, [])
        member = notebook_runner.resolve_member(1, sets[0], declared, NOTEBOOK, Path("/tmp/r"))
    except ConfigError as exc:
        assert len(str(exc)) < 2000 and "Traceback" not in str(exc)  # noqa: PT017
        return
    params = {**member.params, "run_id": "20261129-000000-fuzz-00000000"}
    assert check_plain(params) == params
    # papermill's own injection, as execute_notebook calls it, parsed back with ast
    written = notebook_runner.injected_assignments(notebook_runner.papermill_injection(nb, params))
    assert notebook_runner.same_plain(written, params), (written, params)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(value=YAML_VALUE, as_file=st.booleans())
def test_no_yaml_value_leaves_its_literal(
    value: str, as_file: bool, tmp_path: Path, distill: tuple[Any, notebook_runner.Declared]
) -> None:
    """Tags, anchors, aliases, nesting and quote/newline/backslash text as a ``-p`` value or
    in a ``-f`` file: refused, or injected as exactly the checked value."""
    if as_file:
        path = tmp_path / "fuzz.yaml"
        path.write_text(f"headless: {value}\n", encoding="utf-8")
        _through_the_runner([], [path], distill)
    else:
        _through_the_runner([["headless", value]], [], distill)


PLAIN = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False)
    )
    | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=15,
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(value=PLAIN)
def test_plain_values_arrive_unchanged(
    value: Any, tmp_path: Path, distill: tuple[Any, notebook_runner.Declared]
) -> None:
    """Any plain value written by a YAML dumper reads back equal (same types), and papermill
    writes it as exactly that literal."""
    nb, declared = distill
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"headless": value}), encoding="utf-8")
    (given_set,) = notebook_runner.parameter_sets([], [path], [])
    assert notebook_runner.same_plain(given_set["headless"], value)
    member = notebook_runner.resolve_member(1, given_set, declared, NOTEBOOK, Path("/tmp/r"))
    params = {**member.params, "run_id": "20261129-000000-fuzz-00000000"}
    written = notebook_runner.injected_assignments(notebook_runner.papermill_injection(nb, params))
    assert notebook_runner.same_plain(written, params)
    assert notebook_runner.same_plain(parse_plain_json(json.dumps(value)), value)


def test_the_injection_check_refuses_what_is_not_a_literal() -> None:
    """The runner's own check (run before any run exists) is not a formality."""
    assert notebook_runner.injected_assignments("# Parameters\nx = [1, 'a']\n") == {"x": [1, "a"]}
    for source in [
        'x = "b\'" + str(__import__("os").getpid()) + "\'"',
        "x = 1\nx = 2",
        "import os",
        "x = y = 1",
        "x = (",
    ]:
        with pytest.raises(ConfigError):
            notebook_runner.injected_assignments(source)
    assert not notebook_runner.same_plain({"a": 1}, {"a": True})
    assert not notebook_runner.same_plain([1.0], [1])
