"""The policy loader: the example policy, and a clear file:line: reason for every bad file."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.limiter.types import Measure
from extproc.policy import (
    Action,
    Limits,
    Mode,
    Period,
    PolicyError,
    Pool,
    hash_key,
    load_policy,
    parse_policy,
)
from extproc.policy.model import Share

EXAMPLE = Path(__file__).resolve().parents[2] / "policies" / "example.yaml"
WEB = hash_key("web-raw")
BATCH = hash_key("batch-raw")
MARK = "#<"  # marks the line an error must name

# a small valid policy; each error case replaces one line of it
BASE = f"""\
version: "t1"
pools:
  - name: fast
    tokens_per_minute: 100
  - name: slow
tenants:
  acme:
    limits: {{tokens_per_minute: 1000}}
    projects:
      chat:
        teams:
          support: {{}}
keys:
  - id: web
    sha256: "{WEB}"
    tenant: acme
    project: chat
    team: support
    limits: {{tokens_per_minute: 10}}
  - id: batch
    sha256: "{BATCH}"
    tenant: acme
    project: chat
"""


def _edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, f"{old!r} must occur once in BASE"
    return BASE.replace(old, new)


def _marked_line(text: str) -> int:
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if MARK in line]
    assert len(lines) == 1, "a case marks exactly one line"
    return lines[0]


def per_minute(limits: Limits) -> tuple[int | None, int | None]:
    """(tokens, requests) per sliding minute of every model, as the shorthand wrote them."""
    found = {r.measure: r.limit for r in limits.rules if r.window_s == 60 and r.models is None}
    return found.get(Measure.TOKENS), found.get(Measure.REQUESTS)


def _error(text: str, source: str = "p.yaml") -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source)
    return info.value


# -- the example policy -----------------------------------------------------------------


def test_example_policy_loads_with_the_demo_keys() -> None:
    policy = load_policy(EXAMPLE)
    by_id = {key.key_id: key for key in policy.keys_by_sha256.values()}
    assert set(by_id) == {
        "acme-chatbot-web", "acme-batch", "globex-search", "initech-research-nlp", "initech-support-bot",
        "hooli-prototype",
    }
    assert by_id["acme-chatbot-web"].sha256 == hash_key("tm-demo-acme-web")
    assert by_id["acme-batch"].sha256 == hash_key("tm-demo-acme-batch")
    assert by_id["globex-search"].sha256 == hash_key("tm-demo-globex-search")


def test_example_policy_attributes_each_key_and_sets_its_limits() -> None:
    policy = load_policy(EXAMPLE)
    web = policy.key_for_hash(hash_key("tm-demo-acme-web"))
    batch = policy.key_for_hash(hash_key("tm-demo-acme-batch"))
    search = policy.key_for_hash(hash_key("tm-demo-globex-search"))
    assert web is not None and batch is not None and search is not None
    assert (web.tenant, web.project, web.team) == ("acme", "chatbot", "support")
    assert per_minute(web.limits) == (6000, 120)
    assert (batch.tenant, batch.project, batch.team) == ("acme", "chatbot", None)
    assert per_minute(batch.limits) == (40000, 600)
    assert (search.tenant, search.project, search.team) == ("globex", "search", None)
    assert per_minute(search.limits) == (1500, 30)


def test_example_policy_has_tenants_pools_and_rules() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.pools == (
        Pool("h100", 3000, ("model-h100:8000",),
             shares={"acme": Share(guaranteed=1500, maximum=2700), "globex": Share(guaranteed=1000, maximum=1500)}),
        Pool("a100", 6000, ("model-a100:8000",), models=frozenset({"llama-3.1-70b"})),
        Pool("cheap", None, ("model-cheap:8000",)),
    )
    assert set(policy.tenants) == {"acme", "globex", "initech", "hooli", "umbrella"}
    (idp,) = policy.identity.jwt  # the JWT tenant: its people sign in with their own IdP
    assert (idp.name, idp.tenant_claim, idp.default_project) == ("umbrella-idp", "org", "research")
    assert policy.tenants["umbrella"].time_zone == "Europe/Berlin"
    acme = policy.tenants["acme"]
    assert per_minute(acme.limits) == (200000, 1200)
    assert set(acme.projects["chatbot"].teams) == {"support"}
    assert set(policy.tenants["globex"].projects) == {"search"}
    assert policy.mode is Mode.ENFORCE
    assert policy.request.max_body_bytes == 262144
    assert policy.request.default_max_tokens == 256
    assert policy.request.max_tokens_cap == 4096
    assert policy.source == str(EXAMPLE)


def test_example_policy_shows_calendars_shares_concurrency_and_per_model_rules() -> None:
    policy = load_policy(EXAMPLE)
    initech = policy.tenants["initech"]
    assert (initech.time_zone, initech.billing_anchor_day) == ("America/New_York", 15)
    month = next(r for r in initech.limits.rules if r.period is Period.MONTH)
    assert (month.limit, month.action, month.alert_at) == (500_000_000, Action.BLOCK, (50, 80, 100))
    claude = next(r for r in initech.limits.rules if r.models is not None)
    assert (claude.measure, claude.period, claude.models) == (Measure.OUTPUT_TOKENS, Period.DAY,
                                                              frozenset({"claude-sonnet"}))
    research = initech.projects["research"]
    assert [(r.limit, r.alert_at) for r in research.limits.rules] == [(300_000_000, (90,))]  # 60% of 500M
    assert [r.limit for r in research.teams["nlp"].limits.rules] == [150_000_000]  # 50% of the project's
    assert [r.limit for r in research.teams["vision"].limits.rules] == [90_000_000]
    bot = initech.projects["support-bot"].limits.rules
    assert [(r.measure, r.limit, r.window_s) for r in bot] == [
        (Measure.CONCURRENT, 16, None),
        (Measure.INPUT_TOKENS, 300_000, 60.0),
        (Measure.OUTPUT_TOKENS, 60_000, 60.0),
        (Measure.REQUESTS, 20_000, 86_400.0),
    ]
    hooli = policy.tenants["hooli"].limits
    assert hooli.action is Action.BLOCK
    large = next(r for r in hooli.rules if r.models is not None)
    assert (large.limit, large.window_s, large.action) == (100, 3600.0, Action.THROTTLE)
    assert large.models == frozenset({"llama-3.1-70b", "claude-sonnet"})


def test_example_policy_holds_no_raw_demo_key() -> None:
    text = EXAMPLE.read_text()
    for raw in ("tm-demo-acme-web", "tm-demo-acme-batch", "tm-demo-globex-search"):
        assert raw not in text


# -- a valid file -----------------------------------------------------------------------


def test_optional_sections_take_the_model_defaults() -> None:
    policy = parse_policy(BASE, "p.yaml")
    assert policy.mode is Mode.ENFORCE
    assert policy.request.default_max_tokens == 1024
    assert policy.tenants["acme"].projects["chat"].limits.empty


def test_all_limit_fields_are_read() -> None:
    text = _edit(
        "    limits: {tokens_per_minute: 1000}\n",
        "    limits:\n"
        "      tokens_per_minute: 1_000\n"
        "      requests_per_minute: 20\n"
        "      requests_per_hour: 300\n"
        "      quota_tokens: 50000000\n"
        "      quota_requests: 9000\n"
        "      quota_period: day\n"
        "      action: block\n",
    )
    limits = parse_policy(text, "p.yaml").tenants["acme"].limits
    assert limits.action is Action.BLOCK
    assert [(r.measure, r.limit, r.window_s, r.period, r.action) for r in limits.rules] == [
        (Measure.TOKENS, 1000, 60.0, None, Action.BLOCK),
        (Measure.REQUESTS, 20, 60.0, None, Action.BLOCK),
        (Measure.REQUESTS, 300, 3600.0, None, Action.BLOCK),
        (Measure.TOKENS, 50000000, None, Period.DAY, Action.BLOCK),
        (Measure.REQUESTS, 9000, None, Period.DAY, Action.BLOCK),
    ]
    assert all(r.models is None and r.alert_at == () for r in limits.rules)


def test_explicit_sections_are_read() -> None:
    text = BASE + (
        "mode: shadow\n"
        "request: {max_body_bytes: 1000, default_max_tokens: 10, max_tokens_cap: 20}\n"
    )
    policy = parse_policy(text, "p.yaml")
    assert policy.mode is Mode.SHADOW
    assert (policy.request.max_body_bytes, policy.request.default_max_tokens) == (1000, 10)
    assert policy.request.max_tokens_cap == 20


def test_a_redis_section_is_refused_and_points_to_the_process_settings() -> None:
    # it was read once at start, so a live edit of it silently did nothing
    error = _error(BASE + "redis: {deadline_ms: 5, on_failure: fail_closed}\n")
    assert error.line == BASE.count("\n") + 1
    assert "--redis-deadline-ms" in error.reason and "--redis-failure-mode" in error.reason


def test_a_team_or_project_may_be_left_empty() -> None:
    text = _edit("          support: {}\n", "          support:\n")
    assert parse_policy(text, "p.yaml").tenants["acme"].projects["chat"].teams["support"].limits.empty


def test_yaml_anchors_can_share_limits() -> None:
    text = _edit("    limits: {tokens_per_minute: 1000}\n", "    limits: &std {tokens_per_minute: 1000}\n")
    text = text.replace("    limits: {tokens_per_minute: 10}\n", "    limits: *std\n")
    policy = parse_policy(text, "p.yaml")
    assert per_minute(policy.keys_by_sha256[WEB].limits) == (1000, None)


def test_yaml_aliases_that_expand_without_bound_are_refused() -> None:
    lines = ["x0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]  # 10^8 values
    error = _error("\n".join(lines) + "\n" + BASE)
    assert "YAML aliases here expand to more than 100000 values" in error.reason
    assert error.line is not None and 2 <= error.line <= 8


def test_an_explicit_null_is_not_an_omitted_key() -> None:
    error = _error(_edit("    team: support\n", "    team:\n"))
    assert (error.line, error.reason) == (18, "keys[0].team must be a string, got null (quote it)")
    assert "must be a mapping, got null" in _error(BASE + "identity:\n").reason


def test_an_all_digit_sha256_left_unquoted_is_still_accepted() -> None:
    digits = "1" * 64
    policy = parse_policy(_edit(f'    sha256: "{WEB}"\n', f"    sha256: {digits}\n"), "p.yaml")
    assert digits in policy.keys_by_sha256


# -- errors name the line and the reason ------------------------------------------------

ERROR_CASES = [
    pytest.param(
        'version: "t1"\n', 'version: "t1"\nsurprise: 1  #<\n', "unknown key 'surprise'", id="top-key"
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 1000}\n",
        "    limits: {tokens_per_minute: 1000, tokens_per_second: 5}  #<\n",
        "unknown key 'tokens_per_second' in tenants.acme.limits",
        id="limits-key",
    ),
    pytest.param(
        "    team: support\n",
        "    team: support\n    owner: bob  #<\n",
        "unknown key 'owner' in keys[0]",
        id="apikey-key",
    ),
    pytest.param(
        "    projects:\n",
        "    budget: 5  #<\n    projects:\n",
        "unknown key 'budget' in tenants.acme",
        id="tenant-key",
    ),
    pytest.param(
        "    tokens_per_minute: 100\n",
        "    tokens_per_minute: 100\n    region: eu  #<\n",
        "unknown key 'region' in pools[0]",
        id="pool-key",
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 10}\n",
        "    limits:\n      tokens_per_minute: true  #<\n",
        "keys[0].limits.tokens_per_minute must be a positive integer, got a boolean",
        id="bool-limit",
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 10}\n",
        "    limits:\n      requests_per_minute: 0  #<\n",
        "keys[0].limits.requests_per_minute must be a positive integer, got 0",
        id="zero-limit",
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 1000}\n",
        "    limits: {quota_tokens: -5}  #<\n",
        "tenants.acme.limits.quota_tokens must be a positive integer, got -5",
        id="negative-limit",
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 1000}\n",
        '    limits: {tokens_per_minute: "1000"}  #<\n',
        "must be a positive integer, got a string",
        id="string-limit",
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 1000}\n",
        "    limits: {tokens_per_minute: 1.5}  #<\n",
        "must be a positive integer, got a float",
        id="float-limit",
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 1000}\n",
        "    limits: {tokens_per_minute: null}  #<\n",
        "must be a positive integer, got null",
        id="null-limit",
    ),
    pytest.param(
        "    tokens_per_minute: 100\n",
        "    tokens_per_minute: -1  #<\n",
        "pools[0].tokens_per_minute",
        id="pool-tpm",
    ),
    pytest.param(
        "  - id: batch\n", "  - id: web  #<\n", "duplicate key id 'web' (first at line 14)", id="dup-id"
    ),
    pytest.param(
        f'    sha256: "{BATCH}"\n',
        f'    sha256: "{WEB}"  #<\n',
        "key 'batch': duplicate sha256, already used by key 'web' at line 15",
        id="dup-sha",
    ),
    pytest.param(
        "    tenant: acme\n    project: chat\n    team",
        "    tenant: initech  #<\n    project: chat\n    team",
        "key 'web': unknown tenant 'initech'",
        id="unknown-tenant",
    ),
    pytest.param(
        "    project: chat\n    team",
        "    project: billing  #<\n    team",
        "key 'web': tenant 'acme' has no project 'billing'",
        id="unknown-project",
    ),
    pytest.param(
        "    team: support\n",
        "    team: sales  #<\n",
        "project 'acme.chat' has no team 'sales'",
        id="unknown-team",
    ),
    pytest.param(
        f'    sha256: "{WEB}"\n',
        '    sha256: "abc123"  #<\n',
        "sha256 must be 64 lowercase hex",
        id="short-sha",
    ),
    pytest.param(
        f'    sha256: "{WEB}"\n',
        f'    sha256: "{WEB.upper()}"  #<\n',
        "key 'web': sha256 must be lowercase hex",
        id="upper-sha",
    ),
    pytest.param(
        f'    sha256: "{WEB}"\n',
        f'    sha256: "{WEB[:-1]}g"  #<\n',
        "64 lowercase hex characters",
        id="non-hex-sha",
    ),
    pytest.param(
        'version: "t1"\n', 'version: "t1"\nmode: strict  #<\n', "mode: unknown mode 'strict'", id="mode"
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 1000}\n",
        "    limits: {action: deny}  #<\n",
        "tenants.acme.limits.action: unknown action 'deny' (expected one of: throttle, block, alert)",
        id="action",
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 1000}\n",
        "    limits: {quota_tokens: 5, quota_period: year}  #<\n",
        "unknown quota_period 'year' (expected one of: day, week, month)",
        id="quota-period",
    ),
    pytest.param(
        "pools:\n  - name: fast\n    tokens_per_minute: 100\n  - name: slow\n",
        "pools: []  #<\n",
        "pools must list at least one pool",
        id="empty-pools",
    ),
    pytest.param(
        "  - name: slow\n",
        "  - name: fast  #<\n",
        "duplicate pool name 'fast' (first at line 3)",
        id="dup-pool",
    ),
    pytest.param(
        "  - name: fast\n    tokens_per_minute: 100\n",
        "  - name: fast  #<\n",
        "pool 'fast' has no tokens_per_minute ceiling, so the pools after it (slow) could never serve",
        id="overflow-not-last",
    ),
    pytest.param(
        'version: "t1"\n', "version: 2026  #<\n", "version must be a string, got an integer", id="version"
    ),
    pytest.param(
        "          support: {}\n",
        "          support: {}\n          support: {}  #<\n",
        "duplicate key 'support' in tenants.acme.projects.chat.teams (first at line 12)",
        id="dup-mapping-key",
    ),
    pytest.param(
        "  acme:\n", "  yes:  #<\n", "keys in tenants must be strings, got a boolean", id="bool-name"
    ),
    pytest.param("  - id: batch\n", '  - id: "bad name"  #<\n', "invalid name 'bad name'", id="bad-name"),
    pytest.param(
        "    project: chat\n    team",
        "    project: [chat]  #<\n    team",
        "keys[0].project must be a string, got a list",
        id="list-name",
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 1000}\n",
        "    limits: 1000  #<\n",
        "tenants.acme.limits must be a mapping, got an integer",
        id="limits-type",
    ),
    pytest.param("  - id: batch\n", "  - idd: batch  #<\n", "unknown key 'idd' in keys[1]", id="misspelt-id"),
    pytest.param(
        'version: "t1"\n',
        'version: "t1"\nrequest: {default_max_tokens: 5000, max_tokens_cap: 100}  #<\n',
        "request.default_max_tokens (5000) exceeds request.max_tokens_cap (100)",
        id="default-over-cap",
    ),
    pytest.param(
        "    limits: {tokens_per_minute: 1000}\n",
        "    limits:\n      <<: {tokens_per_minute: 5}  #<\n",
        "merge keys (<<) are not supported",
        id="merge-key",
    ),
    pytest.param(
        "    tokens_per_minute: 100\n",
        "    tokens_per_minute: 100\n    endpoints: [\"gpu-1\"]  #<\n",
        "'gpu-1' is not host:port",
        id="endpoint-without-port",
    ),
    pytest.param(
        "    tokens_per_minute: 100\n",
        "    tokens_per_minute: 100\n    endpoints: []  #<\n",
        "must be a non-empty list",
        id="endpoints-empty",
    ),
]


def test_pool_endpoints_are_read() -> None:
    endpoints = '    endpoints: ["gpu-1:8000", "[::1]:9"]\n'
    text = _edit("    tokens_per_minute: 100\n", "    tokens_per_minute: 100\n" + endpoints)
    assert parse_policy(text, "p.yaml").pools[0].endpoints == ("gpu-1:8000", "[::1]:9")


@pytest.mark.parametrize(("old", "new", "reason"), ERROR_CASES)
def test_invalid_policy_is_rejected_with_its_line_and_reason(old: str, new: str, reason: str) -> None:
    text = _edit(old, new)
    error = _error(text)
    assert error.file == "p.yaml"
    assert error.line == _marked_line(text), str(error)
    assert reason in error.reason
    assert str(error) == f"p.yaml:{error.line}: {error.reason}"


def test_unknown_key_is_rejected_with_its_line() -> None:
    error = _error(_edit("    team: support\n", "    team: support\n    tem: support\n"))
    assert str(error).startswith("p.yaml:19: unknown key 'tem' in keys[0] (allowed: id, sha256, ")


def _without_section(name: str) -> str:
    """BASE less the top-level `name:` line and the indented lines under it."""
    kept: list[str] = []
    skipping = False
    for line in BASE.splitlines(keepends=True):
        if not line.startswith(" "):
            skipping = line.startswith(f"{name}:")
        if not skipping:
            kept.append(line)
    return "".join(kept)


@pytest.mark.parametrize("section", ["version", "tenants", "keys", "pools"])
def test_missing_required_section_is_rejected(section: str) -> None:
    error = _error(_without_section(section))
    assert error.reason == f"missing required key '{section}' in the top level"
    assert error.line == 1


def test_tenants_that_are_not_a_mapping_are_rejected() -> None:
    text = _without_section("tenants") + "tenants: []  #<\n"
    error = _error(text)
    assert (error.line, error.reason) == (_marked_line(text), "tenants must be a mapping, got a list")


def test_keys_that_are_not_a_list_are_rejected() -> None:
    text = _without_section("keys") + "keys: {}  #<\n"
    error = _error(text)
    assert (error.line, error.reason) == (_marked_line(text), "keys must be a list, got a mapping")


def test_missing_key_field_names_the_entry() -> None:
    error = _error(_edit("    project: chat\n    team", "    team"))
    assert error.reason == "missing required key 'project' in keys[0]"
    assert error.line == 14


def test_pasted_raw_key_is_not_echoed_in_the_error() -> None:
    error = _error(_edit(f'    sha256: "{WEB}"\n', '    sha256: "sk-live-very-secret"\n'))
    assert "sk-live-very-secret" not in str(error)
    assert "tokenmeter hash-key" in error.reason


def test_yaml_syntax_error_names_the_problem_line() -> None:
    text = _edit("    project: chat\n    team", "    project: [chat\n    team")
    error = _error(text)
    assert error.reason.startswith("invalid YAML: ")
    assert error.line is not None and 17 <= error.line <= 19


def test_tab_indentation_is_a_yaml_error_on_its_line() -> None:
    error = _error('version: "t1"\npools:\n\t- name: fast\n')
    assert error.line == 3
    assert "invalid YAML" in error.reason


def test_two_documents_in_one_file_are_rejected() -> None:
    error = _error(BASE + "---\n" + BASE)
    assert "invalid YAML" in error.reason
    assert error.line == BASE.count("\n") + 1


def test_control_character_is_a_yaml_error_on_its_line() -> None:
    error = _error('version: "t1"\nmode: \x00\n')
    assert str(error) == "p.yaml:2: invalid YAML: unacceptable character #x0000"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file_is_rejected_without_a_line(text: str) -> None:
    error = _error(text)
    assert error.line is None
    assert str(error) == "p.yaml: policy file is empty"


@pytest.mark.parametrize("text", ["just a string\n", "- a\n- list\n", "42\n"])
def test_top_level_that_is_not_a_mapping_is_rejected(text: str) -> None:
    error = _error(text)
    assert error.line == 1
    assert "policy must be a mapping" in error.reason


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}: policy file not found"


def test_directory_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    assert info.value.line is None
    assert "directory" in info.value.reason


def test_invalid_utf8_is_a_policy_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b'version: "t1"\nmode: \xff\n')
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert (info.value.line, info.value.reason) == (2, "policy file is not valid UTF-8")


def test_load_policy_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(_edit("    team: support\n", "    team: sales\n"))
    with pytest.raises(PolicyError) as info:
        load_policy(str(path))
    assert info.value.file == str(path)
    assert str(info.value).startswith(f"{path}:18: ")


def test_policy_error_formats_with_and_without_a_line() -> None:
    assert str(PolicyError("a.yaml", 3, "bad")) == "a.yaml:3: bad"
    assert str(PolicyError("a.yaml", None, "bad")) == "a.yaml: bad"


# -- nothing but PolicyError escapes ----------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_gives_a_policy_or_a_policy_error(text: str) -> None:
    try:
        parse_policy(text, "fuzz.yaml")
    except PolicyError as error:
        assert error.file == "fuzz.yaml"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mangled_example_lines_give_a_policy_or_a_policy_error(data: st.DataObject) -> None:
    lines = EXAMPLE.read_text().splitlines(keepends=True)
    index = data.draw(st.integers(0, len(lines) - 1))
    replacement = data.draw(st.sampled_from(["", "  x: 1\n", "- 1\n", "  0\n", ":\n", "  true\n", "[\n"]))
    lines[index] = data.draw(st.sampled_from([replacement, lines[index].replace(" ", "", 1)]))
    try:
        parse_policy("".join(lines), "fuzz.yaml")
    except PolicyError as error:
        assert error.line is None or 1 <= error.line <= len(lines) + 1
