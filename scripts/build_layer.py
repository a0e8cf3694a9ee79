"""Build the AWS Lambda layer zip for spaps_client, reproducibly (standard library only).

    python scripts/build_layer.py

writes ``dist/spaps-lambda-layer-<version>.zip`` and prints ``<sha256>  <path>`` (the format
``sha256sum -c`` reads). The zip holds, in the layout Lambda expects (a layer is unpacked into
``/opt`` and ``/opt/python`` is on the runtime's ``sys.path``):

``python/spaps_client.py``
    the module, byte for byte.
``python/__pycache__/spaps_client.cpython-3XX.pyc``
    its bytecode for EACH Python that Lambda runs and the module supports, 3.9 to 3.13.
    ``/opt`` is read-only on Lambda, so without bytecode every cold start compiles the
    module again (tens of milliseconds). Each ``.pyc`` is compiled by an interpreter of that
    minor version, found among the pyenv versions (``$PYENV_ROOT/versions``, or ``pyenv
    root``, or ``~/.pyenv``) or as ``python3.X`` on ``PATH``. It is hash-based and unchecked
    (PEP 552): it embeds no timestamp and the runtime loads it without reading the source;
    it is compiled with ``PYTHONHASHSEED=0`` and the code's file name set to
    ``/opt/python/spaps_client.py``. If an interpreter is missing, the build fails and names
    the missing versions (a layer that is silently slow on one runtime is worse than a
    failed build); ``--compile-with`` builds a layer for the versions you have.
``python/LICENSE.spaps``
    the MIT licence text (the repository's ``LICENSE``), which must travel with every copy
    of the module; the same name docs/vendoring.md uses next to a vendored copy. It sits in
    ``python/`` rather than at the zip root, because Lambda merges all of a function's
    layers into one ``/opt`` and a root ``LICENSE`` would collide with other layers'.

The zip is byte-for-byte reproducible: entries are sorted, every timestamp is
1980-01-01 00:00:00, every file is mode 0644 owned by "unix", and entries are
stored uncompressed (deflate output can differ between zlib builds; the layer is
small, so the bytes saved are not worth a zip that another machine cannot
reproduce). Building twice from the same ``spaps_client.py`` with the same interpreters
gives the same sha256; the interpreters used are listed on stderr (another patch release of
CPython may, rarely, marshal the same code differently, so compare builds made with the
same patch versions).

Options:

``--outdir DIR``
    where to write the zip (default: ``dist/`` of the repository).

``--compile-with PYTHON`` (repeatable)
    ship bytecode only for these interpreters instead of looking for all five; each must
    be the same minor version as the Lambda runtime it is for (for the ``python3.12``
    runtime, pass a Python 3.12). The zip is then named
    ``spaps-lambda-layer-<version>-<tag>[-<tag>...].zip`` (e.g. ``...-cpython-312.zip``)
    because it only helps those Python versions.

``--source-only``
    ship no bytecode at all (the module and the licence only): a layer that works on every
    runtime but compiles the module at every cold start. Named
    ``spaps-lambda-layer-<version>-source.zip``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "spaps_client.py")
LICENSE = os.path.join(ROOT, "LICENSE")
LAYER_DIR = "python"
LICENSE_NAME = "LICENSE.spaps"  # next to the module, as in docs/vendoring.md
RUNTIME_PATH = "/opt/python/spaps_client.py"  # where Lambda puts the module
LAMBDA_PYTHONS = ((3, 9), (3, 10), (3, 11), (3, 12), (3, 13))  # the default layer's bytecode
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
FILE_MODE = 0o100644  # regular file, rw-r--r--
UNIX = 3  # "made by" system in the zip central directory

_COMPILE = """
import py_compile, sys
py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile=sys.argv[3], doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
print(sys.implementation.cache_tag)
"""

_PROBE = "import sys; print(sys.implementation.cache_tag, sys.version.split()[0])"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _probe(python: str) -> Optional[Tuple[str, str]]:
    """``(cache tag, version)`` of interpreter ``python``, or None if it does not run."""
    try:
        done = subprocess.run(  # noqa: S603 - an interpreter we found or were given
            [python, "-S", "-c", _PROBE], capture_output=True, text=True, check=False,
            timeout=60, env={"PATH": os.environ.get("PATH", os.defpath)},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    parts = done.stdout.split()
    if done.returncode != 0 or len(parts) != 2:
        return None
    return parts[0], parts[1]


def _pyenv_roots() -> List[str]:
    roots = []
    if os.environ.get("PYENV_ROOT"):
        roots.append(os.environ["PYENV_ROOT"])
    pyenv = shutil.which("pyenv")
    if pyenv:
        try:
            done = subprocess.run([pyenv, "root"], capture_output=True,  # noqa: S603
                                  text=True, check=False, timeout=30)
            if done.returncode == 0 and done.stdout.strip():
                roots.append(done.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            pass
    roots.append(os.path.join(os.path.expanduser("~"), ".pyenv"))
    unique: List[str] = []
    for root in roots:
        if root not in unique and os.path.isdir(os.path.join(root, "versions")):
            unique.append(root)
    return unique


def _patch_key(directory: str) -> Tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)$", os.path.basename(directory))
    return tuple(int(part) for part in match.groups()) if match else (-1,)


def find_interpreters(
    wanted: Sequence[Tuple[int, int]] = LAMBDA_PYTHONS,
) -> Tuple[Dict[str, str], List[str]]:
    """Find a CPython for each wanted minor version.

    Returns ``({cache tag: interpreter path}, [missing "3.X", ...])``. For each version the
    newest pyenv release ``X.Y.Z`` (final releases only) is tried first, then ``python3.X`` on
    ``PATH`` (a pyenv shim that has no version selected fails the probe and is skipped).
    """
    roots = _pyenv_roots()
    found: Dict[str, str] = {}
    missing: List[str] = []
    for major, minor in wanted:
        tag = f"cpython-{major}{minor}"
        candidates: List[str] = []
        for root in roots:
            dirs = glob.glob(os.path.join(root, "versions", f"{major}.{minor}.*"))
            for directory in sorted(dirs, key=_patch_key, reverse=True):
                if _patch_key(directory) != (-1,):
                    candidates.append(os.path.join(directory, "bin", f"python{major}.{minor}"))
        on_path = shutil.which(f"python{major}.{minor}")
        if on_path:
            candidates.append(on_path)
        for candidate in candidates:
            if os.path.exists(candidate):
                probed = _probe(candidate)
                if probed is not None and probed[0] == tag:
                    found[tag] = candidate
                    break
        else:
            missing.append(f"{major}.{minor}")
    return found, missing


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


def build(outdir: str, compile_with: Optional[Sequence[str]] = None,
          source: str = SOURCE, *, source_only: bool = False,
          license_path: str = LICENSE) -> str:
    """Build the layer zip into ``outdir`` and return its path.

    ``compile_with=None`` (the default) ships bytecode for every Python in
    ``LAMBDA_PYTHONS`` and fails (SystemExit) if an interpreter for one is missing; a list
    of interpreters ships bytecode for those only; ``source_only`` ships none.
    """
    version = read_version(source)
    with open(source, "rb") as handle:
        module = handle.read()
    try:
        with open(license_path, "rb") as handle:
            licence = handle.read()
    except OSError as exc:
        raise SystemExit(f"error: cannot read the licence text {license_path}: {exc}") from None
    entries = [(f"{LAYER_DIR}/spaps_client.py", module), (f"{LAYER_DIR}/{LICENSE_NAME}", licence)]
    name = f"spaps-lambda-layer-{version}"
    pythons: List[str] = []
    if source_only:
        name += "-source"
    elif compile_with:
        pythons = list(compile_with)
    else:
        found, missing = find_interpreters()
        if missing:
            raise SystemExit(
                "error: the default layer carries bytecode for Python "
                + ", ".join(f"{a}.{b}" for a, b in LAMBDA_PYTHONS)
                + f", but no interpreter was found for {', '.join(missing)} "
                "(looked in pyenv's versions and for python3.X on PATH). Install them "
                "(e.g. pyenv install " + " ".join(missing) + "), or build for the runtimes "
                "you have with --compile-with PYTHON (repeatable), or --source-only."
            )
        pythons = [found[tag] for tag in sorted(found)]
    if pythons:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(pythons)) as pool:
            compiled = list(pool.map(lambda python: compile_module(python, source), pythons))
        tags = [tag for tag, _ in compiled]
        if len(set(tags)) != len(tags):
            raise SystemExit(f"error: two interpreters share a cache tag: {tags}")
        for python, (tag, pyc) in zip(pythons, compiled):
            log(f"bytecode {tag}: {python}")
            entries.append((f"{LAYER_DIR}/__pycache__/spaps_client.{tag}.pyc", pyc))
        if compile_with:
            name += "".join(f"-{tag}" for tag in sorted(tags))
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
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--compile-with", metavar="PYTHON", action="append",
                        help="ship bytecode compiled by this interpreter only (repeatable; "
                             "same minor version as the Lambda runtime) instead of for all "
                             "of Python 3.9-3.13")
    choice.add_argument("--source-only", action="store_true",
                        help="ship no bytecode (works everywhere, compiles at every cold start)")
    args = parser.parse_args(argv)
    path = build(args.outdir, args.compile_with, source_only=args.source_only)
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    print(f"{sha256_of(path)}  {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
