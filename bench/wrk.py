"""wrk wrapper: saturation throughput with a POST chat-completions Lua script.

`ensure_wrk` finds wrk on PATH, or installs the Debian package when running as root; the caller
falls back to the Python closed-loop generator (and says so) when neither works.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_LUA = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


@dataclass
class WrkResult:
    target: str
    requests: int
    duration_s: float
    errors: int
    non_2xx: int
    p50_ms: float
    p99_ms: float
    command: str

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.duration_s if self.duration_s else 0.0


def ensure_wrk() -> tuple[str | None, str]:
    """(path to wrk or None, a note on how it was found)."""
    found = shutil.which("wrk")
    if found:
        return found, "wrk from PATH"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "timeout": 300}
        subprocess.run(["apt-get", "update", "-qq"], check=False, **quiet)  # type: ignore[call-overload]
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, **quiet)  # type: ignore[call-overload]
        found = shutil.which("wrk")
        if found:
            return found, "wrk installed with apt-get"
    return None, "wrk not available: saturation measured with the Python closed-loop generator instead"


def write_script(body: bytes, key: str, directory: Path) -> Path:
    path = Path(tempfile.mkstemp(prefix="post-", suffix=".lua", dir=directory)[1])
    path.write_text(_LUA.format(body=body.decode(), key=key))
    return path


def run_wrk(wrk: str, url: str, script: Path, *, target: str, connections: int = 32, duration_s: int = 10) -> WrkResult:
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")
    d = json.loads(line[len("WRKJSON ") :])
    errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    return WrkResult(
        target=target,
        requests=d["requests"],
        duration_s=d["duration_us"] / 1e6,
        errors=errors,
        non_2xx=d["status"],
        p50_ms=d["p50_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        command=" ".join([*argv[:-3], "-s", "bench-post.lua", url]),
    )
