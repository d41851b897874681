"""Generate the Python stubs from protos/ (the one place code generation happens).

    python scripts/gen_protos.py          # write the stubs next to the shared library
    python scripts/gen_protos.py --check  # exit 1 if the committed stubs are stale

Stubs land in tensorwire/<proto path>_pb2*.py, e.g. protos/tensorwire/trainer/v1/
trainer.proto -> tensorwire/trainer/v1/trainer_pb2.py, so their imports match the
proto import paths. Generated files are committed and never edited by hand.
The TypeScript stubs of the browser client (clients/web/src/gen/, protobuf-es v2)
come from the same protoc run with clients/web's protoc-gen-es plugin, once
`npm ci` has installed it there; without it they are left alone (and not checked).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
WEB = ROOT / "clients" / "web"
ES_PLUGIN = WEB / "node_modules" / ".bin" / "protoc-gen-es"
WEB_GEN = Path("clients/web/src/gen")


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # imported late: only this script needs it

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    files = [str(p.relative_to(PROTOS)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    if ES_PLUGIN.exists():
        web_out = out / WEB_GEN
        web_out.mkdir(parents=True, exist_ok=True)
        es_args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--plugin=protoc-gen-es={ES_PLUGIN}",
            f"--es_out={web_out}",
            "--es_opt=target=ts,import_extension=none",
            *files,
        ]
        if protoc.main(es_args) != 0:
            raise SystemExit("protoc (protoc-gen-es) failed")
    # Every generated folder is a regular package.
    for path in list(out.rglob("*_pb2.py")):
        folder = path.parent
        while folder != out:
            (folder / "__init__.py").touch(exist_ok=True)
            folder = folder.parent


def generated_files(base: Path) -> set[Path]:
    found = {
        p.relative_to(base)
        for p in (base / "tensorwire").rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    }
    if ES_PLUGIN.exists():
        found |= {p.relative_to(base) for p in (base / WEB_GEN).rglob("*_pb.ts")}
    return found


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(ROOT)
        stale = sorted(str(p) for p in want ^ have)
        stale += sorted(
            str(p) for p in want & have if not filecmp.cmp(fresh / p, ROOT / p, shallow=False)
        )
    if stale:
        print("generated code is stale; run `python scripts/gen_protos.py`:", file=sys.stderr)
        for name in stale:
            print(f"  {name}", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        return check()
    if ES_PLUGIN.exists():
        for old in (ROOT / WEB_GEN).rglob("*_pb.ts"):
            old.unlink()  # a removed proto leaves no stale TypeScript behind
    generate(ROOT)
    print(f"generated stubs for {len(proto_files())} proto files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
