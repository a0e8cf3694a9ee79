"""Build the AWS Lambda layer zip for spaps_client, reproducibly (standard library only).

    python scripts/build_layer.py

writes ``dist/spaps-lambda-layer-<version>.zip`` holding ``python/spaps_client.py``, the
layout Lambda expects (a layer is unpacked into ``/opt`` and ``/opt/python`` is on the
runtime's ``sys.path``), and prints ``<sha256>  <path>`` (the format ``sha256sum -c`` reads).

The zip is byte-for-byte reproducible: entries are sorted, every timestamp is
1980-01-01 00:00:00, every file is mode 0644 owned by "unix", and entries are
stored uncompressed (deflate output can differ between zlib builds; the layer is
small, so the bytes saved are not worth a zip that another machine cannot
reproduce). Building twice from the same ``spaps_client.py`` gives the same sha256.

Options:

``--outdir DIR``
    where to write the zip (default: ``dist/`` of the repository).

``--compile-with PYTHON``
    also ship ``python/__pycache__/spaps_client.<tag>.pyc`` compiled by the interpreter
    PYTHON, which must be the same minor version as the Lambda runtime (for the
    ``python3.12`` runtime, pass a Python 3.12).  ``/opt`` is read-only on Lambda, so
    without it every cold start compiles the module again.  The ``.pyc`` is hash-based
    and unchecked (PEP 552): it embeds no timestamp, and the runtime loads it without
    re-reading the source; it is compiled with ``PYTHONHASHSEED=0`` and the code's file
    name set to ``/opt/python/spaps_client.py``, so it too is reproducible.  The zip is
    then named ``spaps-lambda-layer-<version>-<tag>.zip`` (e.g. ``...-cpython-312.zip``)
    because it only helps that Python version.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from typing import List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "spaps_client.py")
LAYER_DIR = "python"
RUNTIME_PATH = "/opt/python/spaps_client.py"  # where Lambda puts the module
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
FILE_MODE = 0o100644  # regular file, rw-r--r--
UNIX = 3  # "made by" system in the zip central directory

_COMPILE = """
import py_compile, sys
py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile=sys.argv[3], doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
print(sys.implementation.cache_tag)
"""


def read_version(source: str) -> str:
    """The ``__version__`` string assigned in ``source`` (the file is not imported)."""
    with open(source, encoding="utf-8") as handle:
        match = re.search(r'^__version__ = "([^"]+)"$', handle.read(), re.MULTILINE)
    if match is None:
        raise SystemExit(f"error: no __version__ = \"...\" line in {source}")
    return match.group(1)


def compile_module(python: str, source: str) -> Tuple[str, bytes]:
    """Compile ``source`` with interpreter ``python``; return its cache tag and the pyc bytes."""
    with tempfile.TemporaryDirectory() as scratch:
        target = os.path.join(scratch, "module.pyc")
        # A fixed hash seed makes the marshalled constants (sets, frozensets) come out in the
        # same order every time. Not "-I": isolated mode ignores PYTHONHASHSEED. The
        # environment is replaced whole instead, and the scratch directory is the cwd.
        env = {"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", os.defpath)}
        try:
            done = subprocess.run(  # noqa: S603 - the interpreter the operator named
                [python, "-s", "-c", _COMPILE, os.path.abspath(source), target, RUNTIME_PATH],
                env=env, cwd=scratch, capture_output=True, text=True, check=False,
                timeout=120,
            )
        except OSError as exc:
            raise SystemExit(f"error: cannot run {python}: {exc}") from None
        if done.returncode != 0:
            raise SystemExit(f"error: {python} could not compile {source}:\n{done.stderr}")
        tag = done.stdout.strip()
        if not re.fullmatch(r"[a-z]+-\d+", tag):
            raise SystemExit(f"error: {python} reported an unexpected cache tag {tag!r}")
        with open(target, "rb") as handle:
            return tag, handle.read()


def write_zip(path: str, entries: List[Tuple[str, bytes]]) -> None:
    """Write ``entries`` (name, data) to ``path`` with fixed metadata, atomically."""
    temp = path + ".tmp"
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.create_system = UNIX
            info.external_attr = FILE_MODE << 16
            info.compress_type = zipfile.ZIP_STORED
            archive.writestr(info, data)
    os.replace(temp, path)


def build(outdir: str, compile_with: Optional[str] = None, source: str = SOURCE) -> str:
    """Build the layer zip into ``outdir`` and return its path."""
    version = read_version(source)
    with open(source, "rb") as handle:
        module = handle.read()
    entries = [(f"{LAYER_DIR}/spaps_client.py", module)]
    name = f"spaps-lambda-layer-{version}"
    if compile_with:
        tag, pyc = compile_module(compile_with, source)
        entries.append((f"{LAYER_DIR}/__pycache__/spaps_client.{tag}.pyc", pyc))
        name += f"-{tag}"
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, name + ".zip")
    write_zip(path, entries)
    return path


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/build_layer.py",
        description="Build the reproducible AWS Lambda layer zip for spaps_client.",
    )
    parser.add_argument("--outdir", default=os.path.join(ROOT, "dist"),
                        help="directory for the zip (default: dist/ of the repository)")
    parser.add_argument("--compile-with", metavar="PYTHON",
                        help="also ship a .pyc compiled by this interpreter "
                             "(same minor version as the Lambda runtime)")
    args = parser.parse_args(argv)
    path = build(args.outdir, args.compile_with)
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    print(f"{sha256_of(path)}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
