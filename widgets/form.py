"""The config form: one typed widget per field, built from the config's JSON Schema.

Widgets come from the schema rather than being written by hand so that a new bound or
choice in :mod:`foundry_kernel.config` reaches the panel without anyone editing it:
``enum`` (a ``Literal``) becomes a Dropdown, ``integer``/``number`` a number box,
``boolean`` a Checkbox, ``string`` a Text box; a nullable
number gets a checkbox that switches it off (``None``). Each field's description is its
tooltip. Every change re-validates the *whole* config with the engine's own validator
(cross-field rules included) and shows each message next to the field it names.

Number boxes are unbounded on purpose: ipywidgets' ``Bounded*Text`` clamp what is typed
(``max_steps=0`` silently became 1, ``lr=-0.01`` became 0 and the error then blamed 0.0),
so the box keeps the user's value and the schema's bound is reported by the validator.
Local paths (``data.source``) are checked for existence too, before Start.

Fields the run will not read under the other fields' values (``loss.beta`` unless
``loss.kind`` is ``jsd``, a fresh student's shape for a pretrained one, ...) are greyed
out with the reason beside them (:func:`unused_fields`); they stay editable while they
hold an error, so a bad value can always be fixed.
"""

from __future__ import annotations

import copy
import html
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import ipywidgets as ipw

import foundry_kernel as fk
from foundry_kernel.config import BUILTIN_TEACHER, RunConfig, validate_config
from foundry_kernel.errors import ConfigError

__all__ = ["PANEL_FIELDS", "ConfigForm", "FieldControl", "field_schema", "unused_fields"]

PANEL_FIELDS: tuple[str, ...] = (
    "teacher.source",
    "teacher.backend",
    "teacher.build.data",
    "distill.mode",
    "loss.top_k",
    "student.init",
    "student.hidden_size",
    "student.num_layers",
    "student.num_heads",
    "data.source",
    "data.seq_len",
    "loss.kind",
    "loss.beta",
    "loss.skew_alpha",
    "loss.temperature",
    "loss.ce_weight",
    "loss.scale_by_t2",
    "loss.jsd_normalized",
    "optim.lr",
    "optim.batch_size",
    "optim.grad_accum",
    "limits.max_steps",
    "limits.timeout_s",
    "limits.step_timeout_s",
    "eval.baseline",
)
"""The fields an engineer tweaks between runs; everything else comes from the config."""

_LABEL_STYLE = {"description_width": "120px"}
_INPUT_WIDTH = "300px"
_INT_LIMIT = 2**53  # beyond JavaScript's exact integers a bound means "none"
_FLOAT_LIMIT = 1e300


def field_schema(schema: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    """The JSON Schema of one dotted field, ``$ref``s resolved."""
    node: Mapping[str, Any] = schema
    for part in dotted.split("."):
        node = _deref(schema, node)
        props = node.get("properties", {})
        if part not in props:
            raise KeyError(f"{dotted}: no field {part!r} in the config schema")
        node = props[part]
    return dict(_deref(schema, node))


def _deref(schema: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if not ref:
        return node
    name = str(ref).rsplit("/", 1)[-1]
    return {**schema["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}


def _split_nullable(spec: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """``anyOf: [X, {"type": "null"}]`` -> (X, True)."""
    options = spec.get("anyOf")
    if not options:
        return dict(spec), False
    real = [o for o in options if o.get("type") != "null"]
    nullable = len(real) < len(options)
    inner = dict(real[0]) if len(real) == 1 else {}
    return inner, nullable


def _bounds(spec: Mapping[str, Any], limit: float) -> tuple[float, float]:
    """Inclusive widget bounds; exclusive ones are left to the validator, which names them."""
    low = spec.get("minimum", spec.get("exclusiveMinimum", -limit))
    high = spec.get("maximum", spec.get("exclusiveMaximum", limit))
    return low, high


def _number_widget(spec: Mapping[str, Any], value: Any, label: str, tip: str) -> ipw.Widget:
    """An unbounded number box (no clamping); the bounds only pick a first value."""
    common = {"description": label, "tooltip": tip, "style": _LABEL_STYLE}
    common["layout"] = ipw.Layout(width=_INPUT_WIDTH)
    if spec.get("type") == "integer":
        low, _high = _bounds(spec, _INT_LIMIT)
        first = int(value) if isinstance(value, int | float) else int(max(low, 1))
        return ipw.IntText(value=first, **common)
    low, _high = _bounds(spec, _FLOAT_LIMIT)
    start = float(value) if isinstance(value, int | float) else float(max(low, 0.0))
    return ipw.FloatText(value=start, step=None, **common)


class FieldControl:
    """One field's input widget and the error label beside it."""

    def __init__(self, name: str, spec: Mapping[str, Any], value: Any) -> None:
        self.name = name
        inner, self.nullable = _split_nullable(spec)
        tip = str(spec.get("description", ""))
        label = name.rsplit(".", 1)[-1]
        self._switch: ipw.Checkbox | None = None
        self._tip = tip
        self.unused = ""
        """Why the run will not read this field now ("" when it does)."""
        self.input = self._make_input(inner, value, label, tip)
        self.error = ipw.HTML(layout=ipw.Layout(margin="0 0 0 8px"))
        self.error.add_class("foundry-field-error")
        self.note = ipw.HTML(layout=ipw.Layout(margin="0 0 0 8px"))
        self.note.add_class("foundry-field-note")
        parts: list[ipw.Widget] = [self.input, self.error, self.note]
        if self._switch is not None:
            parts.insert(1, self._switch)
        self.row = ipw.HBox(parts, layout=ipw.Layout(align_items="center"))
        self.row.add_class(f"foundry-field-{name.replace('.', '-').replace('_', '-')}")

    def _make_input(self, spec: Mapping[str, Any], value: Any, label: str, tip: str) -> ipw.Widget:
        kind = spec.get("type")
        if "enum" in spec:
            options = list(spec["enum"])
            return ipw.Dropdown(
                options=options,
                value=value if value in options else spec.get("default", options[0]),
                description=label,
                tooltip=tip,
                style=_LABEL_STYLE,
                layout=ipw.Layout(width=_INPUT_WIDTH),
            )
        if kind == "boolean":
            return ipw.Checkbox(value=bool(value), description=label, tooltip=tip, indent=True)
        if kind in ("integer", "number"):
            widget = _number_widget(spec, value, label, tip)
            if self.nullable:
                self._switch = ipw.Checkbox(
                    value=value is not None,
                    description="set",
                    tooltip="untick for None: " + tip,
                    indent=False,
                    layout=ipw.Layout(width="60px"),
                )
                widget.disabled = value is None
                self._switch.observe(self._on_switch, names="value")
            return widget
        return ipw.Text(
            value="" if value is None else str(value),
            placeholder="None" if self.nullable else "",
            description=label,
            tooltip=tip,
            style=_LABEL_STYLE,
            continuous_update=False,
            layout=ipw.Layout(width=_INPUT_WIDTH),
        )

    def _on_switch(self, change: Mapping[str, Any]) -> None:
        self.input.disabled = not change["new"] or bool(self.unused)

    def set_unused(self, why: str) -> None:
        """Grey the field out, ``why`` shown beside it and in its tooltip, or bring it
        back (``""``)."""
        if why == self.unused:
            return
        self.unused = why
        switched_off = self._switch is not None and not self._switch.value
        self.input.disabled = bool(why) or switched_off
        if self._switch is not None:
            self._switch.disabled = bool(why)
        self.input.tooltip = f"{self._tip} (not used: {why})" if why else self._tip
        self.note.value = (
            f'<span style="color:#9e9e9e;font-size:11px">not used: {html.escape(why)}</span>'
            if why
            else ""
        )
        if why:
            self.row.add_class("foundry-field-unused")
        else:
            self.row.remove_class("foundry-field-unused")

    @property
    def value(self) -> Any:
        """The field's value as the config expects it (None where switched off/empty)."""
        if self._switch is not None and not self._switch.value:
            return None
        value = self.input.value
        if self.nullable and isinstance(self.input, ipw.Text) and not value.strip():
            return None
        return value

    def set_value(self, value: Any) -> None:
        """Set the field programmatically (tests, loading a config)."""
        if self._switch is not None:
            self._switch.value = value is not None
            if value is None:
                return
        if isinstance(self.input, ipw.Text):
            value = "" if value is None else str(value)
        self.input.value = value

    def observe(self, callback: Callable[[Any], None]) -> None:
        self.input.observe(callback, names="value")
        if self._switch is not None:
            self._switch.observe(callback, names="value")

    def show_error(self, message: str) -> None:
        self.error.value = (
            f'<span style="color:#c62828">{html.escape(message)}</span>' if message else ""
        )


def _get_dotted(data: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def unused_fields(data: Mapping[str, Any]) -> dict[str, str]:
    """Fields a run with config ``data`` (nested, as the form builds it) will not read,
    each with why: what to set for it to matter."""
    out: dict[str, str] = {}
    kind = _get_dotted(data, "loss.kind")[1]
    if kind is not None and kind != "jsd":
        for name in ("loss.beta", "loss.jsd_normalized"):
            out[name] = f"only loss.kind=jsd uses it (now {kind})"
    if kind is not None and not str(kind).startswith("skew_"):
        out["loss.skew_alpha"] = f"only the skew_* loss kinds use it (now {kind})"
    temperature = _get_dotted(data, "loss.temperature")[1]
    if temperature == 1:
        out["loss.scale_by_t2"] = "tau^2 is 1 at loss.temperature=1"
    init = _get_dotted(data, "student.init")[1]
    if init is not None and init != "fresh":
        for name in ("student.hidden_size", "student.num_layers", "student.num_heads"):
            out[name] = f"only student.init=fresh uses it (now {init})"
    source = _get_dotted(data, "teacher.source")[1]
    if source is not None and source != BUILTIN_TEACHER:
        out["teacher.build.data"] = f"only teacher.source={BUILTIN_TEACHER} builds a teacher"
    return out


def _attribute(exc: ConfigError, names: Collection[str]) -> tuple[dict[str, str], list[str]]:
    """Split a ConfigError into messages per field (ours) and the rest.

    The engine's message holds one ``field: problem`` line per error; ``exc.field`` names
    the first, which is the fallback when no line can be matched.
    """
    per_field: dict[str, str] = {}
    other: list[str] = []
    for line in str(exc).splitlines()[1:] or [str(exc)]:
        text = line.strip()
        field = text.split(":", 1)[0]
        if field in names:
            per_field[field] = text.split(":", 1)[1].strip()
        elif text:
            other.append(text)
    if not per_field and exc.field is not None and exc.field in names:
        per_field[exc.field] = str(exc)
        other = []
    return per_field, other


class ConfigForm:
    """Field controls for ``fields`` on top of a base config; validates on every change."""

    def __init__(self, base: Mapping[str, Any], fields: Sequence[str] = PANEL_FIELDS) -> None:
        self.base: dict[str, Any] = json.loads(json.dumps(dict(base), default=str))
        schema = RunConfig.model_json_schema()
        defaults = RunConfig().to_dict()
        self.controls: dict[str, FieldControl] = {}
        for name in fields:
            found, value = _get_dotted(self.base, name)
            if not found:
                value = _get_dotted(defaults, name)[1]
            self.controls[name] = FieldControl(name, field_schema(schema, name), value)
        self.message = ipw.HTML()
        self.message.add_class("foundry-config-error")
        self.config: RunConfig | None = None
        self.error: ConfigError | None = None
        self._listeners: list[Callable[[ConfigForm], None]] = []
        for control in self.controls.values():
            control.observe(self._on_change)
        self.validate()

    @property
    def valid(self) -> bool:
        return self.config is not None

    def on_validated(self, callback: Callable[[ConfigForm], None]) -> None:
        """Call ``callback(form)`` after every validation (e.g. to enable Start)."""
        self._listeners.append(callback)

    def values(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    def as_dict(self) -> dict[str, Any]:
        """The base config with the form's values applied (not validated)."""
        data = copy.deepcopy(self.base)
        for name, value in self.values().items():
            _set_dotted(data, name, value)
        return data

    def set(self, name: str, value: Any) -> None:
        """Set one field as a person would (validation runs through the change event)."""
        self.controls[name].set_value(value)

    def _on_change(self, _change: Any) -> None:
        self.validate()

    def validate(self) -> RunConfig | None:
        """Validate the whole config; show each error beside its field."""
        try:
            config = validate_config(self.as_dict())
            if "data.source" in self.controls:
                fk.check_local_source(config.data.source)
            self.config, self.error = config, None
        except ConfigError as exc:
            self.config, self.error = None, exc
        per_field, other = ({}, []) if self.error is None else _attribute(self.error, self.controls)
        unused = unused_fields(self.as_dict())
        for name, control in self.controls.items():
            control.show_error(per_field.get(name, ""))
            # a field with an error stays editable, so it can be fixed
            control.set_unused("" if name in per_field else unused.get(name, ""))
        self.message.value = (
            ""
            if not other
            else f'<pre style="color:#c62828">{html.escape(chr(10).join(other))}</pre>'
        )
        for callback in self._listeners:
            callback(self)
        return self.config

    def sections(self) -> dict[str, list[FieldControl]]:
        """Controls grouped by config section, in field order."""
        out: dict[str, list[FieldControl]] = {}
        for name, control in self.controls.items():
            out.setdefault(name.split(".", 1)[0], []).append(control)
        return out
