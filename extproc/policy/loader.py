"""Load a policy file into `Policy` values, validating strictly.

Three steps, each failing with a `PolicyError` that carries file, line and reason:

1. `lines`: the YAML is composed into nodes and made plain values, with the line of every value
   and key (and the YAML-level checks: string keys, each once, no merge keys).
2. `schema`: the values are validated against the pydantic models of the file (one per kind of
   mapping: types, ranges, names, the shape of a rule); `explain` turns a failure into the line
   of the value at fault and the loader's wording.
3. `build`: the checks that need the whole file, and the typed `Policy`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from extproc.policy.build import build
from extproc.policy.errors import PolicyError
from extproc.policy.explain import explain
from extproc.policy.lines import compose, plain
from extproc.policy.model import Policy
from extproc.policy.schema import PolicyDoc

__all__ = ["PolicyError", "load_policy", "parse_policy", "read_policy_text"]

# mappings keyed by model names (a repeated key there is a "duplicate model")
_MODEL_KEYED = frozenset({("aliases",), ("prices", "models")})


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at `path`."""
    return parse_policy(read_policy_text(path), str(path))


def read_policy_text(path: str | Path) -> str:
    """The text of a policy file; any failure to read it is a PolicyError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise PolicyError(str(path), None, "policy file not found") from None
    except IsADirectoryError:
        raise PolicyError(str(path), None, "policy path is a directory, not a file") from None
    except OSError as exc:
        raise PolicyError(str(path), None, f"cannot read policy file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(str(path), line, "policy file is not valid UTF-8") from None


def parse_policy(text: str, source: str) -> Policy:
    """Validate policy YAML `text`; `source` names it in errors and in `Policy.source`."""
    root = compose(text, source)
    data, lines = plain(root, source, model_keyed=_MODEL_KEYED.__contains__)
    try:
        doc = PolicyDoc.model_validate(data)
    except ValidationError as exc:
        raise explain(exc, data, lines, source) from None
    except RecursionError:
        raise PolicyError(source, None, "policy is nested too deeply") from None
    return build(doc, lines, source)
