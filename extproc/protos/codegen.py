"""Regenerate the Python code of this project's protobuf messages (protos/ -> extproc/protos/).

    python -m extproc.protos.codegen            # write the generated modules
    python -m extproc.protos.codegen --check    # exit 1, listing them, if any differs from protos/

Runs protoc from grpcio-tools (a dev dependency, imported only here, in `main`: the processor never
imports this module) over every `protos/**/*.proto`, with `--python_out` and `--pyi_out` (the .pyi
is what mypy reads). The output is protoc's, with two changes:
  * protoc writes the module paths of the .proto tree (`tokenmeter.v1.admission_pb2`), and the
    modules live under `extproc.protos`, so those names are prefixed with the package: the imports
    between our own generated modules, and the module name protoc gives the message classes (their
    `__module__`, which pickle looks up);
  * a `# ruff: noqa` line, and in the .pyi `# mypy: disallow-any-generics=false` (see `_mark`), so
    that `ruff check .` and `mypy` (strict) pass without exceptions in pyproject.toml.

The generated code depends on the protobuf runtime only, at least the version protoc stamps in it
(`ValidateProtobufRuntimeVersion`, from the grpcio-tools release that generated it).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = _ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent
PACKAGE = "extproc.protos"
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi")


def proto_sources(proto_dir: Path) -> list[str]:
    """The .proto files under `proto_dir`, as protoc names them (relative, with '/')."""
    return sorted(p.relative_to(proto_dir).as_posix() for p in proto_dir.rglob("*.proto"))


def _qualify(text: str, tops: Sequence[str], package: str) -> str:
    """Prefix the module paths of our own .proto tree (top-level dirs `tops`) with `package`."""
    if not tops:
        return text
    names = "|".join(re.escape(t) for t in tops)
    text = re.sub(rf"^(from|import) ((?:{names})\.)", rf"\1 {package}.\2", text, flags=re.MULTILINE)
    return re.sub(rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')((?:{names})\.)", rf"\1{package}.\2", text)


def _mark(text: str, rel: str) -> str:
    """Mark a generated module as not ours to lint: after protoc's own header comments, `# ruff:
    noqa`; in a .pyi also mypy's inline option for the bare `Mapping` protoc writes in message
    constructors (mypy --strict reads the .pyi, not the .py)."""
    marks = ["# ruff: noqa"]
    if rel.endswith(".pyi"):
        marks.append("# mypy: disallow-any-generics=false")
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "".join([*lines[:at], *(f"{m}\n" for m in marks), *lines[at:]])


def generate(proto_dir: Path, package: str = PACKAGE) -> dict[str, bytes]:
    """Run protoc over `proto_dir`; returns the generated files by path relative to the output
    package, each directory's `__init__.py` included. Raises RuntimeError if protoc fails."""
    protoc = importlib.import_module("grpc_tools.protoc")  # dev-only dependency
    sources = proto_sources(proto_dir)
    if not sources:
        raise RuntimeError(f"no .proto files under {proto_dir}")
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(prefix="tokenmeter-codegen-") as tmp:
        args = ["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={tmp}", f"--pyi_out={tmp}", *sources]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_dir}")
        tops = sorted({s.split("/", 1)[0] for s in sources if "/" in s})
        out: dict[str, bytes] = {}
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                rel = path.relative_to(tmp).as_posix()
                out[rel] = _mark(_qualify(path.read_text(encoding="utf-8"), tops, package), rel).encode()
    for rel in list(out):
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.setdefault("/".join([*parts[:i], "__init__.py"]), b"")
    return out


def _existing_generated(out_dir: Path) -> set[str]:
    return {p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.name.endswith(_GENERATED_SUFFIXES)}


def differences(expected: dict[str, bytes], out_dir: Path) -> list[str]:
    """What in `out_dir` differs from `expected`: one line per file (changed, missing, or a
    generated module whose .proto is gone). An `__init__.py` is only required to exist."""
    problems = []
    for rel, data in sorted(expected.items()):
        path = out_dir / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif not rel.endswith("__init__.py") and path.read_bytes() != data:
            problems.append(f"differs: {rel}")
    problems += [f"no source: {rel}" for rel in sorted(_existing_generated(out_dir) - expected.keys())]
    return problems


def write(expected: dict[str, bytes], out_dir: Path) -> list[str]:
    """Write the generated files (an existing `__init__.py` is kept as it is) and delete generated
    modules whose .proto is gone; returns what changed."""
    changed = []
    for line in differences(expected, out_dir):
        kind, rel = line.split(": ", 1)
        path = out_dir / rel
        if kind == "no source":
            path.unlink()
            changed.append(f"deleted {rel}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(expected[rel])
            changed.append(f"wrote {rel}")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.protos.codegen", description="Regenerate the Python code of protos/."
    )
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 listing the files that differ from a fresh generation")
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR, help="the .proto sources (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR,
                        help="where the Python package of the generated code is (default: %(default)s)")
    parser.add_argument("--package", default=PACKAGE, help="the Python name of --out-dir (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        expected = generate(args.proto_dir.resolve(), args.package)
    except RuntimeError as exc:
        print(f"codegen: {exc}", file=sys.stderr)
        return 2
    out_dir: Path = args.out_dir.resolve()
    if args.check:
        problems = differences(expected, out_dir)
        if problems:
            print(f"generated protobuf code in {out_dir} is stale; run `python -m extproc.protos.codegen`:",
                  file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            return 1
        return 0
    for line in write(expected, out_dir):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
