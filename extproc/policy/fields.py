"""The value types of the policy schema: each a pydantic type (what the JSON Schema says) with a
validator that gives the loader's own wording when a value does not fit.

A validator fails with `problem(text)`. The text may hold `{where}` (the value's path, e.g.
`keys[0].limits.tokens_per_minute`), `{place}` (the same, or "the top level") and `{field}` (the
last key of the path); `extproc.policy.explain` fills them in and finds the line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import Field, StringConstraints, WithJsonSchema, WrapValidator
from pydantic_core import PydanticCustomError

from extproc.limiter.calendar import zone
from extproc.limiter.types import MAX_WINDOW_S
from extproc.policy.lines import YamlDate, YamlFloat, YamlInt, is_scalar, kind

_E = TypeVar("_E", bound=StrEnum)
Handler = Callable[[Any], Any]

PROBLEM = "policy"


def problem(
    text: str, *, at: tuple[str | int, ...] = (), at_key: tuple[str | int, ...] = ()
) -> PydanticCustomError:
    """A validation failure worded for the policy file. `at`: the path (below the failing value) of
    the value at fault; `at_key`: of the key at fault (the error names that key's line)."""
    return PydanticCustomError(PROBLEM, "{text}", {"text": text, "at": at, "at_key": at_key})


def _quote_hint(value: object) -> str:
    return " (quote it)" if is_scalar(value) else ""


# -- numbers ----------------------------------------------------------------------------


def _positive(value: Any, _handler: Handler) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise problem(f"{{where}} must be a positive integer, got {kind(value)}")
    if value <= 0:
        raise problem(f"{{where}} must be a positive integer, got {int(value)}")
    return int(value)


PositiveInt = Annotated[int, Field(gt=0), WrapValidator(_positive)]


def _anchor_day(value: Any, _handler: Handler) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 31:
        got = int(value) if isinstance(value, int) and not isinstance(value, bool) else kind(value)
        raise problem(f"{{where}} must be a day of the month, 1 to 31, got {got}")
    return int(value)


AnchorDay = Annotated[int, Field(ge=1, le=31), WrapValidator(_anchor_day)]


def _strict_bool(value: Any, _handler: Handler) -> bool:
    if not isinstance(value, bool):
        raise problem(f"{{where}} must be true or false, got {kind(value)}")
    return value


Bool = Annotated[bool, WrapValidator(_strict_bool)]


def _rate(value: Any, _handler: Handler) -> Decimal:
    expected = "{where} must be a non-negative number (price per million tokens)"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise problem(f"{expected}, got {kind(value)}")
    text = value.text if isinstance(value, YamlInt | YamlFloat) else str(value)
    text = text.strip()
    try:
        rate = Decimal(text)
    except InvalidOperation:
        raise problem(f"{expected}, got '{text[:64]}'") from None
    if not rate.is_finite() or rate < 0:
        raise problem(f"{expected}, got '{text[:64]}'")
    return rate


# read from the YAML text itself (0.15 stays exactly 0.15: never a float)
Rate = Annotated[
    Decimal,
    WithJsonSchema({
        "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}],
    }),
    WrapValidator(_rate),
]


# -- strings ----------------------------------------------------------------------------


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise problem(f"{{where}} must be a string, got {kind(value)}{_quote_hint(value)}")
    if not value.strip():
        raise problem("{where} must not be empty")
    return value


def _nonempty_text(value: Any, _handler: Handler) -> str:
    return _text(value)


Text = Annotated[str, StringConstraints(min_length=1), WrapValidator(_nonempty_text)]

# names end up in Redis keys, metric labels and routing metadata: keep them plain
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)


def _name(value: Any, _handler: Handler) -> str:
    text = _text(value)
    if not _NAME.match(text):
        raise problem(
            f"invalid name '{text[:160]}' in {{where}}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 128 characters)"
        )
    return text


Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN), WrapValidator(_name)]

_PART = NAME_PATTERN.strip("^$")
OWNER_PATTERN = f"^{_PART}(/{_PART})?$"
_OWNER = re.compile(OWNER_PATTERN)


def _owner(value: Any, _handler: Handler) -> str:
    text = _text(value)
    if not _OWNER.match(text):
        raise problem(f"invalid owner '{text[:160]}' in {{where}}: a tenant name, or \"tenant/project\"")
    return text


# who holds a share of a pool: a tenant, or "tenant/project"
Owner = Annotated[str, StringConstraints(pattern=OWNER_PATTERN), WrapValidator(_owner)]

MODEL_NAME_MAX = 256


def _model_name(value: Any, _handler: Handler) -> str:
    text = _text(value)
    if len(text) > MODEL_NAME_MAX:
        raise problem(f"{{where}}: model name is {len(text)} characters; at most {MODEL_NAME_MAX}")
    return text


# model names carry '/' and ':' ("org/llama:latest"): any text of 1 to 256 characters
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=MODEL_NAME_MAX), WrapValidator(_model_name)]

_SHA256 = re.compile(r"[0-9a-f]{64}")
SHA256_PATTERN = "^[0-9a-f]{64}$"


def _sha256(value: Any, _handler: Handler) -> str:
    """The digest text. Never echo the value: a raw key pasted here must not reach a log."""
    hint = "hash the raw key with `tokenmeter hash-key`"
    if not is_scalar(value):
        raise problem(f"sha256 must be a string, got {kind(value)}; {hint}")
    text = value.text if isinstance(value, YamlInt | YamlFloat | YamlDate) else str(value)
    if _SHA256.fullmatch(text):
        return text
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise problem("sha256 must be lowercase hex")
    raise problem(f"sha256 must be 64 lowercase hex characters (got {len(text)} characters); {hint}")


Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN), WrapValidator(_sha256)]


def _timestamp(value: Any, _handler: Handler) -> float:
    """An ISO-8601 timestamp with a UTC offset (2026-01-31T00:00:00Z, ...+02:00), quoted or not, as
    epoch seconds. Without an offset the instant would depend on the host's zone: refused."""
    expected = "{where} must be an ISO-8601 timestamp with a UTC offset, e.g. 2026-01-31T00:00:00Z"
    if not isinstance(value, str | YamlDate):
        raise problem(f"{expected}; got {kind(value)}")
    text = (value.text if isinstance(value, YamlDate) else value).strip()
    shown = text if len(text) <= 64 else text[:64] + "..."
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise problem(f"{expected}; got '{shown}'") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise problem(f"{expected}; '{shown}' has no offset (add Z or +HH:MM)")
    return when.timestamp()


# the model keeps epoch seconds; the file holds ISO-8601 text
Timestamp = Annotated[float, WithJsonSchema({"type": "string", "format": "date-time"}), WrapValidator(_timestamp)]

_CLAIM_PATTERN = r"^[A-Za-z0-9_.:/-]{1,128}$"


def _claim(value: Any, _handler: Handler) -> str:
    text = _text(value)
    if not re.match(_CLAIM_PATTERN, text):
        raise problem(f"{{where}}: '{text[:64]}' is not a claim name (letters, digits, _ . : / -)")
    return text


Claim = Annotated[str, StringConstraints(pattern=_CLAIM_PATTERN), WrapValidator(_claim)]

ENDPOINT_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$"
_ENDPOINT = re.compile(r"(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")


def _endpoint(value: Any, _handler: Handler) -> str:
    text = _text(value)
    match = _ENDPOINT.fullmatch(text)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise problem(f"{{where}}: '{text[:300]}' is not host:port (e.g. model-h100:8000)")
    return text


Endpoint = Annotated[str, StringConstraints(pattern=ENDPOINT_PATTERN), WrapValidator(_endpoint)]

_CURRENCY = re.compile(r"[A-Z]{3}")


def _currency(value: Any, _handler: Handler) -> str:
    text = _text(value)
    if not _CURRENCY.fullmatch(text):
        raise problem(f"{{where}} must be an ISO 4217 code such as USD or EUR, got '{text[:64]}'")
    return text


Currency = Annotated[str, StringConstraints(pattern="^[A-Z]{3}$"), WrapValidator(_currency)]

REASON_MAX = 200


def _reason(value: Any, _handler: Handler) -> str:
    """Why a key is disabled: told to its caller in the 403, so one short printable line."""
    text = _text(value)
    if len(text) > REASON_MAX or not text.isprintable():
        raise problem(f"reason must be one printable line of at most {REASON_MAX} characters")
    return text


Reason = Annotated[str, StringConstraints(min_length=1, max_length=REASON_MAX), WrapValidator(_reason)]


def _time_zone(value: Any, _handler: Handler) -> str:
    text = _text(value)
    try:
        zone(text)
    except ValueError:
        raise problem(
            f"{{where}}: unknown time zone '{text[:64]}' (an IANA name such as UTC, Europe/Berlin or "
            "America/New_York)"
        ) from None
    return text


TimeZone = Annotated[str, StringConstraints(min_length=1), WrapValidator(_time_zone)]

# request headers an authenticator may set: lowercase HTTP tokens, never one that carries a
# credential, frames the request, or is Envoy's or the processor's own
HEADER_PATTERN = r"^[a-z0-9!#$%&'*+.^_`|~-]+$"
RESERVED_HEADERS = frozenset(
    {"authorization", "x-api-key", "host", "content-length", "content-type", "transfer-encoding"}
)
RESERVED_HEADER_PREFIXES = (":", "x-tokenmeter-", "x-envoy-")


def _header(value: Any, _handler: Handler) -> str:
    text = _text(value)
    if not re.match(HEADER_PATTERN, text):
        raise problem(
            f"{{where}}: '{text[:64]}' is not a lowercase header name (letters a-z, digits and "
            "! # $ % & ' * + - . ^ _ ` | ~)"
        )
    if text in RESERVED_HEADERS or text.startswith(RESERVED_HEADER_PREFIXES):
        raise problem(
            f"{{where}}: '{text}' is reserved: a trusted header is none of {', '.join(sorted(RESERVED_HEADERS))}, "
            f"and starts with none of {', '.join(repr(p) for p in RESERVED_HEADER_PREFIXES)}"
        )
    return text


Header = Annotated[str, StringConstraints(pattern=HEADER_PATTERN), WrapValidator(_header)]


# -- enums ------------------------------------------------------------------------------


def enum_of(enum: type[_E]) -> WrapValidator:
    """One of the enum's values, named in the error when another is given."""
    choices = ", ".join(member.value for member in enum)

    def check(value: Any, _handler: Handler) -> _E:
        if not isinstance(value, str):
            raise problem(f"{{where}} must be one of: {choices}; got {kind(value)}")
        try:
            return enum(value)
        except ValueError:
            raise problem(f"{{where}}: unknown {{field}} '{value[:64]}' (expected one of: {choices})") from None

    return WrapValidator(check)


# -- containers -------------------------------------------------------------------------


def list_of(expected: str, *, non_empty: bool = False, empty: str | None = None) -> WrapValidator:
    """A list (non-empty if asked: `empty` is then the error for an empty one); its items are then
    checked one by one."""

    def check(value: Any, handler: Handler) -> Any:
        if isinstance(value, list) and not value and empty is not None:
            raise problem(empty)
        if not isinstance(value, list) or (non_empty and not value):
            raise problem(f"{{where}} must be {expected}, got {kind(value)}")
        return handler(value)

    return WrapValidator(check)


def map_of(expected: str) -> WrapValidator:
    def check(value: Any, handler: Handler) -> Any:
        if not isinstance(value, dict):
            raise problem(f"{{where}} must be {expected}, got {kind(value)}")
        return handler(value)

    return WrapValidator(check)


# -- limits -----------------------------------------------------------------------------

PERCENT_PATTERN = r"^(100|[1-9][0-9]?)%$"
_PERCENT = re.compile(r"(100|[1-9][0-9]?)%")


def _limit(value: Any, _handler: Handler) -> int | str:
    expected = '{where} must be a positive integer or a percent from "1%" to "100%"'
    if isinstance(value, str):
        if _PERCENT.fullmatch(value.strip()):
            return value.strip()
        raise problem(f"{expected}, got '{value[:64]}'")
    if isinstance(value, bool) or not isinstance(value, int):
        raise problem(f"{expected}, got {kind(value)}")
    if value <= 0:
        raise problem(f"{expected}, got {int(value)}")
    return int(value)


# a number, or (on a project or a team) a share of the parent's like rule: "40%"
LimitValue = Annotated[
    Annotated[int, Field(gt=0)] | Annotated[str, StringConstraints(pattern=PERCENT_PATTERN)],
    WrapValidator(_limit),
]


def percent_of(value: int | str) -> int | None:
    """40 for "40%"; None for a plain number."""
    return int(value.strip().rstrip("%")) if isinstance(value, str) else None


WINDOW_PATTERN = r"^[1-9][0-9]*[smhd]$"
_WINDOW = re.compile(r"([1-9][0-9]*)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW = int(MAX_WINDOW_S)


def _window(value: Any, _handler: Handler) -> int:
    expected = (
        f'{{where}} must be a length such as "30s", "1m", "5m", "1h" or "1d", or whole seconds, at most 7d '
        f"({MAX_WINDOW})"
    )
    if isinstance(value, str):
        match = _WINDOW.fullmatch(value.strip())
        if match is None:
            raise problem(f"{expected}; got '{value[:64]}'")
        seconds = int(match[1]) * _UNIT_S[match[2]]
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = int(value)
        if seconds <= 0:
            raise problem(f"{expected}; got {seconds}")
    else:
        raise problem(f"{expected}; got {kind(value)}")
    if seconds > MAX_WINDOW:
        raise problem(f"{{where}}: a window is at most 7d ({MAX_WINDOW} seconds), got {seconds} seconds")
    return seconds


# a sliding window: "30s", "1m", "1h", "1d"... or whole seconds; at most 7 days
Window = Annotated[
    Annotated[int, Field(gt=0, le=MAX_WINDOW)] | Annotated[str, StringConstraints(pattern=WINDOW_PATTERN)],
    WrapValidator(_window),
]

ALERT_MAX = 1000


def _alert_at(value: Any, _handler: Handler) -> tuple[int, ...]:
    expected = (
        f"{{where}} must be a list of percents (whole numbers 1 to {ALERT_MAX}) in increasing order, "
        "e.g. [80, 100]"
    )
    if not isinstance(value, list) or not value:
        raise problem(f"{expected}; got {kind(value)}")
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= ALERT_MAX:
            got = int(item) if isinstance(item, int) and not isinstance(item, bool) else kind(item)
            raise problem(f"{expected}; got {got}", at=(index,))
        if index and item <= value[index - 1]:
            raise problem(f"{expected}; {int(item)} after {int(value[index - 1])}", at=(index,))
    return tuple(int(item) for item in value)


AlertAt = Annotated[
    tuple[Annotated[int, Field(ge=1, le=ALERT_MAX)], ...],
    WithJsonSchema({
        "type": "array", "minItems": 1, "uniqueItems": True,
        "items": {"type": "integer", "minimum": 1, "maximum": ALERT_MAX},
    }),
    WrapValidator(_alert_at),
]
