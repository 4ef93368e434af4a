"""Safetensors read and write with no whole-model copies.

Reading memory-maps the file and validates the header before any tensor is touched. Writing knows every
tensor's shape and dtype up front (the merge plan does), so it writes the header first and then each tensor's
bytes at its final offset as soon as the tensor is ready, in any order and from any thread: memory stays bounded
by the tensors in flight, not by the shard size.

Format: 8-byte little-endian header length N, N bytes of JSON (``{name: {dtype, shape, data_offsets}}`` plus an
optional ``__metadata__`` of strings), then the data buffer; offsets are relative to the buffer start.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Any

import torch

from mergesmith.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """One memory-mapped safetensors file. ``get`` returns a zero-copy tensor view (read-only use)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > MAX_HEADER or 8 + header_len > size:
                    raise CheckpointError(
                        f"{self.path}: corrupt or truncated safetensors header (length {header_len}, file size "
                        f"{size}); re-download or re-save the file"
                    )
                raw = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(
                f"{self.path}: corrupt safetensors header (not JSON); re-download the file"
            ) from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        data_len = size - self.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                code, shape, (begin, end) = (
                    info["dtype"],
                    tuple(int(s) for s in info["shape"]),
                    info["data_offsets"],
                )
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path}: tensor '{_shown(name)}' has a malformed header entry"
                ) from None
            if not isinstance(code, str) or code not in DTYPES:
                raise CheckpointError(
                    f"{self.path}: tensor '{_shown(name)}' has unsupported dtype '{_shown(code)}'"
                )
            dtype = DTYPES[code]
            nbytes = math.prod(shape) * element_size(dtype)
            if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
                raise CheckpointError(
                    f"{self.path}: tensor '{_shown(name)}' has offsets [{begin}, {end}) that do not fit its shape "
                    f"{list(shape)} or the file ({data_len} data bytes); the file is truncated or corrupt"
                )
            self.entries[name] = (dtype, shape, begin, end)
        spans = sorted((b, e, n) for n, (_, _, b, e) in self.entries.items() if e > b)
        for (_, e1, n1), (b2, _, n2) in itertools.pairwise(spans):
            if b2 < e1:
                raise CheckpointError(
                    f"{self.path}: tensors '{_shown(n1)}' and '{_shown(n2)}' overlap in the file; it is corrupt"
                )
        self._mmap: mmap.mmap | None = None
        self._map_lock = threading.Lock()  # worker threads may ask for the first tensor at the same time

    def _map(self) -> mmap.mmap:
        with self._map_lock:
            if self._mmap is None:
                self._mmap = self._open_map()
        return self._mmap

    def _open_map(self) -> mmap.mmap:
        with open(self.path, "rb") as f:
            # ACCESS_COPY: a private mapping, writable as far as torch.frombuffer is concerned; the file is
            # never modified and pages are shared with the page cache until written (they never are).
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def keys(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, _end = self.entries[name]
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map(), dtype=dtype, count=count, offset=self.data_start + begin)
        return flat.reshape(shape)

    def close(self) -> None:
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # a tensor view still exists: freed with it
                self._mmap.close()
            self._mmap = None


def _shown(text: object) -> str:
    """A string from a file's header as it appears in a one-line error: the header is untrusted, so control
    characters (a newline in a tensor name) are escaped."""
    text = str(text)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class StreamingDigest:
    """sha256 of a file written out of order, advanced while it is written.

    Writers report each finished byte range; whichever thread extends the contiguous finished prefix hashes it
    (read back from the page cache) and asks the kernel to start writing it to disk, so that when the last byte
    arrives only the tail is left to hash and to fsync (both were ~1.5 s per GB at the end of a merge).
    """

    CHUNK = 1 << 24

    def __init__(self, fd: int, total: int):
        self.fd = fd
        self.total = total
        self.upto = 0
        self._digest = hashlib.sha256()
        self._finished: dict[int, int] = {}  # start → end of finished ranges beyond the prefix
        self._lock = threading.Condition()
        self._hashing = False
        self._failed = False

    def finished(self, start: int, end: int) -> None:
        with self._lock:
            if end > start:
                # adjacent ranges chain through the dict: start → end, end → next end, ...
                self._finished[start] = end
            if self._hashing:
                return  # the thread that is hashing will pick this range up
            self._hashing = True
        try:
            while True:
                with self._lock:
                    end = self._finished.pop(self.upto, None)
                    if end is None:
                        return
                    start = self.upto
                self._hash(start, end)
                with self._lock:
                    self.upto = end
        except BaseException:
            with self._lock:
                self._failed = True  # the caller falls back to hashing the file (and reports its error)
            raise
        finally:
            with self._lock:
                self._hashing = False
                self._lock.notify_all()

    def wait(self) -> None:
        """Until no thread is hashing (before the file is closed)."""
        with self._lock:
            self._lock.wait_for(lambda: not self._hashing)

    def _hash(self, start: int, end: int) -> None:
        position = start
        while position < end:
            data = os.pread(self.fd, min(self.CHUNK, end - position), position)
            if not data:
                raise OSError(f"short read at {position} while hashing")
            self._digest.update(data)
            position += len(data)
        _start_writeback(self.fd, start, end - start)

    def hexdigest(self) -> str | None:
        """The digest once every byte was reported and hashed, else None (the caller hashes the file)."""
        self.wait()
        with self._lock:
            return self._digest.hexdigest() if self.upto == self.total and not self._failed else None


def _start_writeback(fd: int, offset: int, count: int) -> None:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): start writing these pages now, without waiting, so the final
    fsync has little left to do. Elsewhere (or if it fails) the fsync does all the work, as before."""
    if _SYNC_FILE_RANGE is None:
        return
    with contextlib.suppress(OSError, ValueError):
        _SYNC_FILE_RANGE(fd, offset, count, 2)  # SYNC_FILE_RANGE_WRITE


def _load_sync_file_range():
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6", use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()


class ShardWriter:
    """Writes one safetensors file whose layout is fixed at construction; tensors arrive in any order."""

    def __init__(
        self, path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ):
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self.offsets: dict[str, tuple[int, int]] = {}
        for name, dtype, shape in tensors:
            nbytes = math.prod(shape) * element_size(dtype)
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self.offsets[name] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data buffer aligned to 8 bytes
        self.data_start = 8 + len(raw)
        self.total = self.data_start + offset
        self.remaining = set(self.offsets)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self.fd, self.total)
        self.digest = StreamingDigest(self.fd, self.total)
        self.digest.finished(0, self.data_start)

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> int:
        """Write ``tensor`` (or rows ``first_row…`` of it) into its slot; returns the bytes written."""
        offset, nbytes = self.offsets[name]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        row_bytes = data.nbytes // tensor.shape[0] if tensor.dim() and tensor.shape[0] else 0
        start = first_row * row_bytes
        if start + data.nbytes > nbytes or (first_row == 0 and tensor.dim() == 0 and data.nbytes != nbytes):
            raise AssertionError(f"{name}: {data.nbytes} bytes at {start} for a slot of {nbytes}")
        view = memoryview(data)
        first = position = self.data_start + offset + start
        while view.nbytes:  # pwrite may write less than asked (large buffers, full disk reports an error)
            written = os.pwrite(self.fd, view, position)
            view = view[written:]
            position += written
        self.digest.finished(first, position)
        return data.nbytes

    def sha256(self) -> str | None:
        """The file's sha256 when every byte was written through ``write`` (else None)."""
        return self.digest.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            self.digest.wait()  # a thread may still be reading the file to hash it
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def save_file(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a dict of tensors as one safetensors file (small helper for tests and tools)."""
    writer = ShardWriter(
        Path(path), [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata or {"format": "pt"}
    )
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    finally:
        writer.close()
