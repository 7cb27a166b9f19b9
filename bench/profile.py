"""Optional: sample the processor with py-spy (``pip install py-spy``) during a load phase.

`--profile` on bench.run records raw stacks (non-blocking sampling, so the processor is not paused)
and writes a summary of the hottest frames (self and inclusive). Without py-spy the run goes on
and says so.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.raw = pid, out
        self.proc: subprocess.Popen[bytes] | None = None
        self.error = ""

    def start(self) -> bool:
        exe = find_py_spy()
        if exe is None:
            self.error = "py-spy not installed (pip install py-spy)"
            return False
        argv = [exe, "record", "-p", str(self.pid), "-f", "raw", "-o", str(self.raw), "-r", "200", "--nonblocking"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.raw.exists():
            self.error = f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"


def summarize(raw: Path, top: int = 25) -> str:
    """Markdown: the hottest frames by self and by inclusive share of samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";")]  # drop line numbers
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no samples\n"
    lines = [f"{total} samples (py-spy, non-blocking, 200 Hz), all threads of the processor", ""]
    for title, counter in (("self", own), ("inclusive", incl)):
        lines += [f"| {title} % | frame |", "|---|---|"]
        lines += [f"| {v / total * 100:.1f} | `{k}` |" for k, v in counter.most_common(top)]
        lines.append("")
    return "\n".join(lines)
