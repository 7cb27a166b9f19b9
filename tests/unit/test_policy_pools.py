"""Pools in the policy file: the models each serves, fair shares of its ceiling, the routing section,
and what `tokenmeter policy check` tells about them (each model's chain, oversubscribed pools, models
no pool serves). Every error names the file and the line at fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from extproc.policy import PolicyError, parse_policy
from extproc.policy.capacity import routes
from extproc.policy.model import Policy, Pool, Share

MARK = "#<"  # marks the line an error must name

BASE = """\
version: "pools-1"
models: [big, small, orphan]
aliases: {big-latest: big}
pools:
  - name: h100
    tokens_per_minute: 1000
    models: [big-latest]
    shares:
      acme: {guaranteed: "40%", max: "80%"}
      globex/web: {guaranteed: 250}
  - name: a100
    tokens_per_minute: 3000
    models: [big, small]
  - name: cheap
    models: [big, small]
routing: {hysteresis_percent: 20, max_wait_ms: 500, show_pool: false}
tenants:
  acme: {projects: {chat: {}}}
  globex: {projects: {web: {}, batch: {}}}
keys: []
"""


def _edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, f"{old!r} must occur once in BASE"
    return BASE.replace(old, new)


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return info.value


def _marked_line(text: str) -> int:
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if MARK in line]
    assert len(lines) == 1, "a case marks exactly one line"
    return lines[0]


def _pool(policy: Policy, name: str) -> Pool:
    return next(p for p in policy.pools if p.name == name)


def test_pools_keep_their_order_models_shares_and_the_routing_section() -> None:
    policy = parse_policy(BASE, "p.yaml")
    assert [p.name for p in policy.pools] == ["h100", "a100", "cheap"]
    h100 = _pool(policy, "h100")
    assert h100.models == frozenset({"big"}), "an alias in a pool's models is the model it stands for"
    assert h100.serves("big") and not h100.serves("small")
    assert _pool(policy, "cheap").tokens_per_minute is None
    # percents are of the pool's ceiling; an omitted max is the whole ceiling
    assert h100.shares == {
        "acme": Share(guaranteed=400, maximum=800), "globex/web": Share(guaranteed=250, maximum=1000),
    }
    assert (policy.routing.hysteresis, policy.routing.max_wait_ms, policy.routing.show_pool) == (0.2, 500, False)


def test_routing_defaults_and_a_pool_without_models_serves_every_model() -> None:
    text = _edit("routing: {hysteresis_percent: 20, max_wait_ms: 500, show_pool: false}\n", "")
    text = text.replace("    tokens_per_minute: 3000\n    models: [big, small]\n", "    tokens_per_minute: 3000\n")
    policy = parse_policy(text, "p.yaml")
    assert (policy.routing.hysteresis, policy.routing.max_wait_ms, policy.routing.show_pool) == (0.1, 0, True)
    a100 = _pool(policy, "a100")
    assert a100.models is None and a100.serves("orphan") and a100.serves("anything")


def test_a_percent_share_rounds_up_to_whole_tokens() -> None:
    text = _edit("    tokens_per_minute: 1000\n", "    tokens_per_minute: 1001\n")
    text = text.replace('{guaranteed: "40%", max: "80%"}', '{guaranteed: "33%", max: "34%"}')
    assert _pool(parse_policy(text, "p.yaml"), "h100").shares["acme"] == Share(guaranteed=331, maximum=341)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        pytest.param(
            "  - name: cheap\n    models: [big, small]\n",
            f"  - name: cheap\n    models: [big, small]\n    shares:  {MARK}\n      acme: {{guaranteed: 10}}\n",
            "pool 'cheap' has shares but no tokens_per_minute ceiling to share",
            id="share-on-a-pool-without-ceiling",
        ),
        pytest.param(
            '      acme: {guaranteed: "40%", max: "80%"}\n',
            f'      acme: {{guaranteed: "90%", max: "80%"}}  {MARK}\n',
            "pools[0].shares.acme: guaranteed (900) is above max (800)",
            id="guaranteed-above-max-percent",
        ),
        pytest.param(
            '      acme: {guaranteed: "40%", max: "80%"}\n',
            f"      acme: {{guaranteed: 500, max: 400}}  {MARK}\n",
            "pools[0].shares.acme: guaranteed (500) is above max (400)",
            id="guaranteed-above-max",
        ),
        pytest.param(
            "      globex/web: {guaranteed: 250}\n",
            f"      globex/web: {{guaranteed: 1200}}  {MARK}\n",
            "pools[0].shares.globex/web.guaranteed: 1200 is above the pool's ceiling (1000 tokens per minute)",
            id="guarantee-above-ceiling",
        ),
        pytest.param(
            "      globex/web: {guaranteed: 250}\n",
            f"      initech: {{guaranteed: 250}}  {MARK}\n",
            "pool 'h100': share owner 'initech' is not a tenant or tenant/project of this policy",
            id="unknown-tenant",
        ),
        pytest.param(
            "      globex/web: {guaranteed: 250}\n",
            f"      globex/mail: {{guaranteed: 250}}  {MARK}\n",
            "pool 'h100': share owner 'globex/mail' is not a tenant or tenant/project of this policy",
            id="unknown-project",
        ),
        pytest.param(
            "    tokens_per_minute: 1000\n    models: [big-latest]\n",
            f"    tokens_per_minute: 1000\n    models:\n      - big-latest\n      - huge  {MARK}\n",
            "pools[0].models: model 'huge' is not listed under models or aliases",
            id="unknown-model",
        ),
        pytest.param(
            "    tokens_per_minute: 1000\n    models: [big-latest]\n",
            f"    tokens_per_minute: 1000\n    models:\n      - big\n      - big  {MARK}\n",
            "duplicate model 'big' in pools[0].models",
            id="duplicate-model",
        ),
        pytest.param(
            "  - name: a100\n    tokens_per_minute: 3000\n",
            f"  - name: a100  {MARK}\n",
            "pool 'a100' has no tokens_per_minute ceiling, so the pools after it (cheap) could never serve; "
            "put the overflow pool last",
            id="uncapped-pool-before-a-pool-of-the-same-model",
        ),
        pytest.param(
            "    tokens_per_minute: 3000\n    models: [big, small]\n",
            f"    tokens_per_minute: 3000\n    models: []  {MARK}\n",
            "pool 'a100' lists no models",
            id="a-pool-that-serves-nothing",
        ),
        pytest.param(
            "routing: {hysteresis_percent: 20, max_wait_ms: 500, show_pool: false}\n",
            f"routing: {{hysteresis_percent: 20, max_wait_ms: 5000}}  {MARK}\n",
            "routing.max_wait_ms",
            id="wait-beyond-two-seconds",
        ),
        pytest.param(
            "routing: {hysteresis_percent: 20, max_wait_ms: 500, show_pool: false}\n",
            f"routing: {{hysteresis_percent: 60}}  {MARK}\n",
            "routing.hysteresis_percent",
            id="hysteresis-above-half",
        ),
    ],
)
def test_a_bad_pool_is_rejected_with_its_line_and_reason(old: str, new: str, reason: str) -> None:
    text = _edit(old, new)
    error = _error(text)
    assert (error.file, error.line) == ("p.yaml", _marked_line(text)), str(error)
    assert reason in error.reason, str(error)
    assert str(error).startswith(f"p.yaml:{_marked_line(text)}: ")


def test_an_overflow_pool_may_come_first_for_models_the_later_pools_do_not_serve() -> None:
    text = _edit("  - name: h100\n", "  - name: orphan-box\n    models: [orphan]\n  - name: h100\n")
    policy = parse_policy(text, "p.yaml")
    assert [p.name for p in policy.pools] == ["orphan-box", "h100", "a100", "cheap"]
    assert _pool(policy, "orphan-box").tokens_per_minute is None
    # ... but not for a model a later pool serves
    clash = _edit("  - name: h100\n", f"  - name: any-box  {MARK}\n    models: [orphan, small]\n  - name: h100\n")
    error = _error(clash)
    assert error.line == _marked_line(clash)
    assert "pool 'any-box' has no tokens_per_minute ceiling, so the pools after it (a100, cheap)" in error.reason


# -- tokenmeter policy check --------------------------------------------------------------


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extproc.cli", "policy", "check", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_policy_check_prints_each_models_pool_chain(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE)
    result = _check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "  big: h100 (1000 tokens/min) -> a100 (3000 tokens/min) -> cheap (no ceiling)",
        "  orphan: no pool",
        "  small: a100 (3000 tokens/min) -> cheap (no ceiling)",
    ]
    assert f"{path}: warning: model 'orphan' is served by no pool: its requests get 404 model_not_found" in (
        result.stderr)
    assert "oversubscribed" not in result.stderr, "650 guaranteed of 1000 is within the ceiling"


def test_the_chains_of_a_policy_that_lists_no_models_name_the_pools_models_and_any_other() -> None:
    text = """\
version: "1"
aliases: {fast: llama}
pools:
  - name: h100
    tokens_per_minute: 100
    models: [fast]
  - name: cheap
tenants: {acme: {}}
keys: []
"""
    assert routes(parse_policy(text, "p.yaml")) == [
        "llama: h100 (100 tokens/min) -> cheap (no ceiling)",
        "(any other model): cheap (no ceiling)",
    ]
    plain = text.replace("aliases: {fast: llama}\n", "").replace("    models: [fast]\n", "")
    assert routes(parse_policy(plain, "p.yaml")) == ["(any model): h100 (100 tokens/min) -> cheap (no ceiling)"]


def test_policy_check_warns_about_an_oversubscribed_pool(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(_edit("      globex/web: {guaranteed: 250}\n", '      globex/web: {guaranteed: "70%"}\n'))
    result = _check(path)
    assert result.returncode == 0, result.stderr
    assert (
        f"{path}: warning: pool 'h100' is oversubscribed: its guarantees sum to 1100 tokens per minute "
        "(acme 400, globex/web 700), above its ceiling of 1000"
    ) in result.stderr
    assert "pool 'a100'" not in result.stderr


def test_policy_check_refuses_a_bad_pool_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    text = _edit("      globex/web: {guaranteed: 250}\n", f"      globex/mail: {{guaranteed: 250}}  {MARK}\n")
    path.write_text(text)
    result = _check(path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:{_marked_line(text)}: pool 'h100': share owner 'globex/mail'"), (
        result.stderr)
