"""The policy file's JSON Schema: generated from the loader's models, checked in and current, and it
accepts the example policy; `tokenmeter policy schema` and `policy check` through the CLI."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.policy.lines import compose, plain
from extproc.policy.schema import PolicyDoc, policy_json_schema, policy_schema_text

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "policies" / "policy.schema.json"
EXAMPLE = ROOT / "policies" / "example.yaml"
E2E_POLICY = ROOT / "tests" / "e2e" / "policy.yaml"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_the_checked_in_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == policy_schema_text(), (
        "regenerate: tokenmeter policy schema -o policies/policy.schema.json")


def test_the_example_names_the_schema_for_editors() -> None:
    assert EXAMPLE.read_text().splitlines()[0] == "# yaml-language-server: $schema=./policy.schema.json"


def test_the_schema_documents_every_field() -> None:
    schema = policy_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "Token Meter policy"
    assert set(schema["required"]) == {"version", "pools", "tenants", "keys"}
    for name, definition in [("", schema), *schema["$defs"].items()]:
        for field, prop in definition.get("properties", {}).items():
            described = "description" in prop or ("$ref" in prop and "description" in _resolve(schema, prop["$ref"]))
            assert described, f"{name}.{field} has no description"
    limits = schema["$defs"]["Limits"]["properties"]
    assert {"tokens_per_minute", "concurrent_requests", "alert_at", "rules", "quota_period"} <= set(limits)
    tenant = schema["$defs"]["Tenant"]["properties"]
    assert tenant["billing_anchor_day"]["minimum"] == 1 and tenant["billing_anchor_day"]["maximum"] == 31
    assert "trusted_headers" in schema["$defs"]["Identity"]["properties"]


@pytest.mark.parametrize("path", [EXAMPLE, E2E_POLICY], ids=["example", "e2e"])
def test_the_schema_accepts_the_shipped_policies(path: Path) -> None:
    text = path.read_text()
    data, _ = plain(compose(text, str(path)), str(path))
    PolicyDoc.model_validate(data)  # the models the schema is generated from
    problems = _check(policy_json_schema(), yaml.safe_load(text))
    assert problems == [], problems
    if importlib.util.find_spec("jsonschema") is not None:  # optional: not a dependency
        importlib.import_module("jsonschema").validate(yaml.safe_load(text), policy_json_schema())


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (("version: ", "versio: "), ""),  # an unknown top-level key (and version missing)
        (("limits: {tokens_per_minute: 200000, requests_per_minute: 1200}",
          "limits: {tokens_per_minute: 200000, requests_per_minute: 1200, burst: 3}"), "tenants/acme/limits"),
        (("billing_anchor_day: 15", "billing_anchor_day: 40"), "tenants/initech/billing_anchor_day"),
        (("- {input_tokens: 300000, window: 1m}", "- {input_tokens: 300000, window: 1m, period: day}"),
         "tenants/initech/projects/support-bot/limits/rules/0"),
        (("- {input_tokens: 300000, window: 1m}", "- {input_tokens: 300000, tokens: 1, window: 1m}"),
         "tenants/initech/projects/support-bot/limits/rules/0"),
        (("quota_period: day", "quota_period: hour"), "tenants/hooli/limits/quota_period"),
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(edit: tuple[str, str], where: str) -> None:
    text = EXAMPLE.read_text()
    assert text.count(edit[0]) >= 1, edit[0]
    problems = _check(policy_json_schema(), yaml.safe_load(text.replace(edit[0], edit[1], 1)))
    assert problems and any(p.startswith(where) for p in problems), problems


# -- the CLI ----------------------------------------------------------------------------


def test_policy_schema_prints_the_schema_or_writes_it(tmp_path: Path) -> None:
    printed = _cli("policy", "schema")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == SCHEMA_FILE.read_text(encoding="utf-8")
    out = tmp_path / "schema.json"
    written = _cli("policy", "schema", "-o", str(out))
    assert written.returncode == 0 and written.stdout == ""
    assert json.loads(out.read_text())["title"] == "Token Meter policy"
    failed = _cli("policy", "schema", "-o", str(tmp_path / "missing" / "schema.json"))
    assert failed.returncode == 2 and "cannot write" in failed.stderr


def test_policy_check_accepts_the_example_and_names_the_line_of_a_bad_rule(tmp_path: Path) -> None:
    ok = _cli("policy", "check", str(EXAMPLE))
    assert ok.returncode == 0, ok.stderr
    assert "OK (version 2026-11-27.1, 5 tenants, 6 keys" in ok.stdout
    text = EXAMPLE.read_text()
    old = '            - {tokens: "60%", period: month, alert_at: [90]}'
    assert text.count(old) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(old, '            - {tokens: "60%", period: week}'))
    result = _cli("policy", "check", str(bad))
    assert result.returncode == 2
    line = next(n for n, row in enumerate(bad.read_text().splitlines(), 1) if 'period: week}' in row)
    assert re.match(rf"{re.escape(str(bad))}:{line}: tenants\.initech\.projects\.research\.limits\.rules\[0\]\.tokens: "
                    r"60% of what\? tenant 'initech' has no rule for tokens per week", result.stderr), result.stderr


# -- a small JSON Schema checker: the keywords the generated schema uses ------------------


def _resolve(root: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/$defs/"), ref
    found: dict[str, Any] = root["$defs"][ref.removeprefix("#/$defs/")]
    return found


_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def _check(root: dict[str, Any], value: Any, schema: dict[str, Any] | None = None, at: str = "") -> list[str]:
    """Where `value` breaks `schema` (a subset of JSON Schema 2020-12: the keywords we generate)."""
    schema = root if schema is None else schema
    out: list[str] = []
    if "$ref" in schema:
        out += _check(root, value, _resolve(root, schema["$ref"]), at)
    kind = schema.get("type")
    if kind is not None:
        python = _TYPES[kind]
        if not isinstance(value, python) or (kind in ("integer", "number") and isinstance(value, bool)):
            return [*out, f"{at}: not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{at}: not one of {schema['enum']}")
    bounds: tuple[tuple[str, Callable[[float, float], bool]], ...] = (
        ("minimum", lambda v, b: v >= b), ("maximum", lambda v, b: v <= b), ("exclusiveMinimum", lambda v, b: v > b))
    for key, test in bounds:
        if key in schema and isinstance(value, int | float) and not test(value, schema[key]):
            out.append(f"{at}: {key} {schema[key]}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{at}: does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            out.append(f"{at}: length")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            out.append(f"{at}: too few items")
        if schema.get("uniqueItems") and len({json.dumps(v) for v in value}) != len(value):
            out.append(f"{at}: repeated items")
        for index, item in enumerate(value):
            if "items" in schema:
                out += _check(root, item, schema["items"], f"{at}/{index}".lstrip("/"))
    if isinstance(value, dict):
        out += [f"{at}: missing {k}" for k in schema.get("required", ()) if k not in value]
        for key, item in value.items():
            here = f"{at}/{key}".lstrip("/")
            if key in schema.get("properties", {}):
                out += _check(root, item, schema["properties"][key], here)
                continue
            patterns = [p for p in schema.get("patternProperties", {}) if re.search(p, key)]
            for pattern in patterns:
                out += _check(root, item, schema["patternProperties"][pattern], here)
            if not patterns and "additionalProperties" in schema:
                extra = schema["additionalProperties"]
                out += [f"{here}: not allowed"] if extra is False else _check(root, item, extra, here)
    for sub in schema.get("allOf", ()):
        out += _check(root, value, sub, at)
    if "anyOf" in schema:
        branches = [_check(root, value, sub, at) for sub in schema["anyOf"]]
        if all(branches):  # what each branch found
            out += [f"{at}: matches none of anyOf", *(p for found in branches for p in found)]
    if "oneOf" in schema and sum(not _check(root, value, sub, at) for sub in schema["oneOf"]) != 1:
        out.append(f"{at}: does not match exactly one of oneOf")
    if "not" in schema and not _check(root, value, schema["not"], at):
        out.append(f"{at}: matches not")
    return out
