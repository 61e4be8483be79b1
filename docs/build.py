"""Build the API reference: pdoc over the engine's docstrings plus the config schema page.

    python docs/build.py [OUT_DIR]      (default: docs/_build, not committed)

The schema page is generated from ``RunConfig`` itself, so it can never drift from the
code: every field with its type, default, bounds and description, the schema version, and
how older configs are migrated.
"""

from __future__ import annotations

import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

import pdoc

from foundry_kernel.config import SCHEMA_VERSION, json_schema

MIGRATION = """\
## Versions and migration

Every config carries `schema_version` (this Foundry writes and reads version {v}).
A config with a *newer* version is refused with a message asking to upgrade Foundry. When a
version {n} is introduced, `foundry_kernel.config.validate_config` gains a
`_migrate_{v}_to_{n}` step that rewrites a version-{v} mapping (renamed or moved fields,
changed defaults made explicit) before validation, so saved runs and notebooks keep
loading; the run store records the config as it was run.
"""


def schema_markdown(schema: dict[str, Any]) -> str:
    """One table per section: field, type, default, bounds, description."""
    defs = schema.get("$defs", {})
    lines = [f"# Run configuration (schema_version {SCHEMA_VERSION})", ""]
    lines += [
        "Generated from `foundry_kernel.config.RunConfig`; `foundry schema` prints the",
        "JSON Schema.",
        "",
    ]
    sections: list[tuple[str, dict[str, Any]]] = [("(top level)", schema)]
    pending = [("", schema)]
    while pending:
        prefix, node = pending.pop(0)
        for name, prop in node.get("properties", {}).items():
            ref = prop.get("$ref") or next(
                (a["$ref"] for a in prop.get("anyOf", []) if "$ref" in a), None
            )
            if ref:
                child = defs[ref.split("/")[-1]]
                sections.append((f"{prefix}{name}", child))
                pending.append((f"{prefix}{name}.", child))
    for name, node in sections:
        lines += [
            f"## `{name}`",
            "",
            "| field | type | default | bounds | description |",
            "|---|---|---|---|---|",
        ]
        for field, prop in node.get("properties", {}).items():
            if "$ref" in prop:
                continue
            lines.append(
                f"| `{field}` | {_type(prop)} | `{json.dumps(prop.get('default'))}` | "
                f"{_bounds(prop)} | {prop.get('description', '')} |"
            )
        lines.append("")
    lines.append(MIGRATION.format(v=SCHEMA_VERSION, n=SCHEMA_VERSION + 1))
    return "\n".join(lines)


def _type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " / ".join(f"`{v}`" for v in prop["enum"])
    variants = prop.get("anyOf", [prop])
    return " or ".join(str(v.get("type", v.get("const", "?"))) for v in variants)


def _bounds(prop: dict[str, Any]) -> str:
    marks = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤", "exclusiveMaximum": "<"}
    found = []
    for variant in prop.get("anyOf", [prop]):
        found += [f"{sym} {variant[k]}" for k, sym in marks.items() if k in variant]
    return ", ".join(found)


def build(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    import foundry_kernel

    # The public surface only: the package's exports and its public modules and
    # subpackages (private ``_`` modules are implementation, see docs/architecture.md).
    names = [
        m.name
        for m in pkgutil.walk_packages(foundry_kernel.__path__, prefix="foundry_kernel.")
        if m.name != "foundry_kernel.__main__"
    ]
    private = [n for n in names if any(part.startswith("_") for part in n.split("."))]
    public = [n for n in names if n not in private]
    modules = ["foundry_kernel", *public, *(f"!{n}" for n in private)]
    pdoc.pdoc(*modules, output_directory=out)
    (out / "config-schema.md").write_text(schema_markdown(json_schema()), encoding="utf-8")
    (out / "config-schema.json").write_text(json.dumps(json_schema(), indent=2), encoding="utf-8")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "_build"
    print(build(target))
