"""The config schema: defaults, overrides, and errors that name the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from foundry_kernel.config import (
    SCHEMA_VERSION,
    RunConfig,
    json_schema,
    load_config,
    parse_override,
    validate_config,
)
from foundry_kernel.errors import ConfigError


def test_defaults_are_valid_and_versioned() -> None:
    cfg = load_config()
    assert cfg.schema_version == SCHEMA_VERSION
    assert cfg.teacher.source == "builtin:tiny-teacher"
    assert validate_config(cfg.to_dict()) == cfg


def test_overrides_parse_types() -> None:
    cfg = load_config(
        overrides=[
            "loss.temperature=2",
            "eval.baseline=false",
            "optim.lr=1e-4",
            "student.layers=[0, 2]",
            "student.init=from_teacher",
        ]
    )
    assert cfg.loss.temperature == 2.0
    assert cfg.eval.baseline is False
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.student.layers == [0, 2]


def test_mapping_overrides_and_roundtrip(tmp_path: Path) -> None:
    cfg = load_config({"loss": {"kind": "jsd"}}, {"loss.beta": 0.25})
    assert (cfg.loss.kind, cfg.loss.beta) == ("jsd", 0.25)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg
    jpath = tmp_path / "c.json"
    jpath.write_text(json.dumps(cfg.to_dict()))
    assert load_config(jpath) == cfg


@pytest.mark.parametrize(
    ("override", "field", "fragment"),
    [
        ("loss.temprature=2", "loss.temprature", "did you mean 'loss.temperature'"),
        ("optim.lr=-1", "optim.lr", "greater than 0"),
        ("optim.batch_size=many", "optim.batch_size", "'many'"),
        ("loss.kind=kl", "loss.kind", "forward_kl"),
        ("loss.beta=1.5", "loss.beta", "less than or equal to 1"),
        ("data.source=builtin:nope", "data.source", "builtin:python-docs"),
        ("teacher.source=not a model!", "teacher.source", "hub id"),
        ("student.layers=[2, 1]", "student.layers", "increasing"),
        ("name=../../etc", "name", "letters"),
        ("bogus=1", "bogus", "unknown field"),
        ("eval.sample_temperature=0", "eval.sample_temperature", "greater than 0"),
        ("eval.sample_top_p=1.5", "eval.sample_top_p", "less than or equal to 1"),
        ("eval.sample_top_p=0", "eval.sample_top_p", "greater than 0"),
        ("eval.checkpoint_samples=-1", "eval.checkpoint_samples", "greater than or equal to 0"),
        ("eval.checkpoint_samples=two", "eval.checkpoint_samples", "'two'"),
    ],
)
def test_errors_name_field_value_and_fix(override: str, field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert info.value.field == field
    assert field in str(info.value)
    assert fragment in str(info.value)


def test_sample_settings_default_and_override() -> None:
    ev = load_config().eval
    assert (ev.sample_temperature, ev.sample_top_p, ev.checkpoint_samples) == (0.8, 0.95, 1)
    ev = load_config(
        overrides=[
            "eval.sample_temperature=1.2",
            "eval.sample_top_p=1",
            "eval.checkpoint_samples=0",
        ]
    ).eval
    assert (ev.sample_temperature, ev.sample_top_p, ev.checkpoint_samples) == (1.2, 1.0, 0)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("loss.temperature")
    with pytest.raises(ConfigError, match="dotted field name"):
        parse_override("loss..x=1")
    with pytest.raises(ConfigError, match="not a section"):
        load_config(overrides=["seed=1", "seed.x=2"])


def test_config_files_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [unclosed")
    with pytest.raises(ConfigError, match="not valid"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_newer_schema_refused() -> None:
    with pytest.raises(ConfigError, match="newer") as info:
        validate_config({"schema_version": SCHEMA_VERSION + 1})
    assert info.value.field == "schema_version"


def _leaf_properties(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    defs = schema.get("$defs", {})
    out: list[tuple[str, dict[str, Any]]] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, prop in node.get("properties", {}).items():
            ref = prop.get("$ref") or next(
                (a["$ref"] for a in prop.get("anyOf", []) if "$ref" in a), None
            )
            if ref:
                walk(defs[ref.split("/")[-1]], f"{prefix}{name}.")
            else:
                out.append((f"{prefix}{name}", prop))

    walk(schema, "")
    return out


def test_schema_every_field_documented_defaulted_and_bounded() -> None:
    schema = json_schema()
    leaves = _leaf_properties(schema)
    assert len(leaves) > 50
    for name, prop in leaves:
        assert prop.get("description"), f"{name} has no description"
        assert "default" in prop, f"{name} has no default"
        types = {prop.get("type")} | {a.get("type") for a in prop.get("anyOf", [])}
        if types & {"integer", "number"}:
            variants = [prop, *prop.get("anyOf", [])]
            bounded = any(
                k in v
                for v in variants
                for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "const")
            )
            assert bounded, f"{name} has no bounds"


def test_config_is_strict_on_assignment() -> None:
    cfg = RunConfig()
    with pytest.raises(ValueError, match="temperature"):
        cfg.loss.temperature = -1


# --- pen test, issue 15 (#9): every path field, teacher.build.data ------------------


def _text_fields() -> list[str]:
    """Every leaf of the schema that holds text (paths, ids, names, prompts, choices)."""
    out = []
    for name, prop in _leaf_properties(json_schema()):
        variants = [prop, *prop.get("anyOf", [])]
        if any(v.get("type") == "string" or "enum" in v for v in variants):
            out.append(name)
        elif any(
            v.get("type") == "array" and v.get("items", {}).get("type") == "string"
            for v in variants
        ):
            out.append(name + "[]")
    return out


TEXT_FIELDS = _text_fields()
PATH_FIELDS = ["runs_dir", "data.source", "teacher.source", "student.source", "teacher.build.data"]


def test_the_text_fields_include_every_path_field() -> None:
    assert set(PATH_FIELDS) <= set(TEXT_FIELDS) and len(TEXT_FIELDS) > 15


@pytest.mark.parametrize("field", TEXT_FIELDS)
def test_a_nul_byte_in_any_text_field_is_a_clear_error(field: str, tmp_path: Path) -> None:
    """A NUL in runs_dir used to pass the schema and end in a traceback from the file
    system; the class is every text field, from a file (YAML's "\\0") or a mapping."""
    name = field.removesuffix("[]")
    value: Any = ["ok", "a\x00b"] if field.endswith("[]") else "a\x00b"
    where = f"{name}[1]" if field.endswith("[]") else name
    with pytest.raises(ConfigError) as info:
        load_config(overrides={name: value})
    assert info.value.field == where and "NUL byte" in str(info.value)
    section, _, key = name.rpartition(".")
    nested: dict[str, Any] = {key: value}
    for part in reversed(section.split(".") if section else []):
        nested = {part: nested}
    path = tmp_path / "nul.yaml"
    path.write_text(yaml.safe_dump(nested), encoding="utf-8")
    assert "\\0" in path.read_text(encoding="utf-8")  # the dumper escapes it
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == where and "NUL byte" in str(info.value)


def test_teacher_build_data_is_checked_like_data_source() -> None:
    """``builtin:evil`` used to fail at run time with a traceback; one rule checks both."""
    messages = []
    for field in ("data.source", "teacher.build.data"):
        with pytest.raises(ConfigError) as info:
            load_config(overrides={field: "builtin:evil"})
        assert info.value.field == field
        messages.append(str(info.value).split("(", 1)[1])
    assert messages[0] == messages[1] and "builtin:python-docs" in messages[0]
    assert load_config(overrides={"teacher.build.data": "builtin:python-stdlib"})


def test_runs_dir_is_confined_like_other_local_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from foundry_kernel.cli import main as cli_main

    for outside in ("/etc/foundry-runs", "/proc/self/x", "../" * 30 + "etc/x"):
        with pytest.raises(ConfigError) as info:
            load_config(overrides={"runs_dir": outside})
        assert info.value.field == "runs_dir" and "outside the allowed folders" in str(info.value)
    for inside in (tmp_path / "runs", "runs", "~/foundry-runs"):
        assert load_config(overrides={"runs_dir": str(inside)}).runs_dir == Path(inside)
    assert cli_main(["distill", "--set", "runs_dir=/etc/foundry-runs"]) == 2
    assert cli_main(["distill", "--runs-dir", "/etc/foundry-runs"]) == 2
    err = capsys.readouterr().err
    assert err.count("outside the allowed folders") == 2 and "Traceback" not in err
    assert not Path("/etc/foundry-runs").exists()
    nul = tmp_path / "nul-runs.yaml"
    nul.write_text('runs_dir: "runs\\0x"\n', encoding="utf-8")
    assert cli_main(["distill", "--config", str(nul)]) == 2
    err = capsys.readouterr().err
    assert "runs_dir" in err and "NUL byte" in err and "Traceback" not in err
