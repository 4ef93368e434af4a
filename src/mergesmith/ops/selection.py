"""Exact order statistics over a whole model, streamed with bounded memory.

Whole-model methods (TIES' global trim, PCB's global quantiles) need the k-th smallest value of a vector that is
the concatenation of every tensor of the model, one vector per expert. Sorting it needs the whole vector in memory;
instead we select by radix over the floats' bit patterns:

- each float is mapped to an integer key whose order is the float order (negative floats get their magnitude bits
  flipped), so any value, not only |τ|, can be ranked;
- pass 1 histograms the top 16 bits of every key (65 536 bins per row), which fixes the bucket holding the wanted
  rank; each later pass histograms the next 16 bits of the keys inside that bucket. fp32 needs 2 passes, fp64 4.

Memory is one 65 536-bin histogram per row and wanted rank, whatever the model size; the result is exact. NaNs are
not supported (they rank above +inf).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence

import torch

_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
_MASK = _BINS - 1

# A pass over the data: each call yields ``[R, n_i]`` chunks (R rows, the same for every chunk).
Chunks = Callable[[], Iterable[torch.Tensor]]


def sortable_keys(values: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, int]:
    """int keys (int32 for width 32, int64 for 64) with the same order as the floats (signed), and the key width
    in bits.

    ``width`` 64 ranks the values as fp64, 32 as fp32; by default fp64 input gives 64, anything else 32.
    """
    if width is None:
        width = 64 if values.dtype == torch.float64 else 32
    return _sortable(values, width)[0], width


def _sortable(values: torch.Tensor, width: int) -> tuple[torch.Tensor, bool]:
    """The keys, and whether they are all non-negative (then the fast histogram paths apply)."""
    if width == 64:
        bits = values.to(torch.float64).contiguous().view(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits), False
    # int32 keys: the same order, at a fraction of the cost of widening to int64 (digits are widened later)
    bits = values.to(torch.float32).contiguous().view(torch.int32)
    if bits.numel() and int(bits.min()) >= 0:  # magnitudes (the common case): the bits are already the keys
        return bits, True
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits), False


def _key_to_float(key: int, width: int) -> float:
    if width == 64:
        bits = key if key >= 0 else key ^ 0x7FFFFFFFFFFFFFFF
        return struct.unpack("<d", struct.pack("<q", bits))[0]
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _top_digit(keys: torch.Tensor, width: int) -> torch.Tensor:
    # The top digit of a signed key, offset so that its unsigned order is the key order.
    return ((keys >> (width - _DIGIT_BITS)) & _MASK) ^ (1 << (_DIGIT_BITS - 1))


def _signed_top(digit: int) -> int:
    value = digit ^ (1 << (_DIGIT_BITS - 1))
    return value - _BINS if value >= (1 << (_DIGIT_BITS - 1)) else value


def _accumulate(hist: torch.Tensor, index: torch.Tensor) -> None:
    """hist[index] += 1 for a flat int64 histogram: scatter for small inputs, bincount for large ones (int32
    indices go to bincount as they are: widening them costs more than the count)."""
    if index.numel() < 4 * _BINS:
        index = index.to(torch.int64)
        hist.index_add_(0, index, torch.ones_like(index))
    else:
        hist += torch.bincount(index, minlength=hist.numel())


def _accumulate_digits(hist: torch.Tensor, keys: torch.Tensor, width: int, nonnegative: bool) -> None:
    """Histogram of the top digits of one row of keys into ``hist`` (``_BINS`` bins)."""
    if nonnegative and keys.numel() >= 4 * _BINS:
        # sign bit 0: the top digit is keys >> shift (< 2^15) and lands in the upper half of the offset bins;
        # skipping the mask and xor halves the cost of the pass
        half = 1 << (_DIGIT_BITS - 1)
        hist[half:] += torch.bincount(keys >> (width - _DIGIT_BITS), minlength=half)
    else:
        _accumulate(hist, _top_digit(keys, width))


def _accumulate_bucket(
    hist: torch.Tensor, keys: torch.Tensor, prefix: int, fixed_shift: int, shift: int, nonnegative: bool
) -> None:
    """Histogram of the next digit of the keys whose bits above ``fixed_shift`` equal ``prefix``."""
    if shift == 0 and keys.dtype == torch.int32 and keys.numel() >= 4 * _BINS:
        # last digit of non-negative int32 keys: key − (prefix << 16) is the digit inside the bucket and out of
        # [0, 2^16) outside it; clamping the outsiders into two spill bins avoids a boolean gather (with keys of
        # both signs the difference could overflow int32)
        low = prefix << fixed_shift
        if nonnegative and low >= 0 and low + _BINS <= (1 << 31):
            offset = (keys - low).clamp_(-1, _BINS).add_(1)
            hist += torch.bincount(offset, minlength=_BINS + 2)[1 : _BINS + 1]
            return
    inside = keys[(keys >> fixed_shift) == prefix]
    if inside.numel():
        _accumulate(hist, (inside >> shift) & _MASK)


def _pick(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th smallest entry (1-based) and the rank left inside that bin."""
    cumulative = hist.cumsum(0)
    digit = int(
        torch.searchsorted(cumulative, torch.tensor(rank, dtype=cumulative.dtype, device=cumulative.device))
    )
    below = int(cumulative[digit - 1]) if digit > 0 else 0
    return digit, rank - below


def _first_pass(chunks: Chunks, forced: int | None) -> tuple[torch.Tensor | None, int, int]:
    """Histogram of the top digits per row: (flat histogram, column count, key width; width 0 = mixed dtypes)."""
    hists: torch.Tensor | None = None
    total = 0
    width = forced
    for chunk in chunks():
        rows = chunk.reshape(chunk.shape[0], -1)
        if rows.shape[1] == 0:
            continue
        natural = 64 if rows.dtype == torch.float64 else 32
        if width is None:
            width = natural
        elif forced is None and natural != width:
            return None, 0, 0
        keys, nonnegative = _sortable(rows, width)
        if hists is None:
            hists = torch.zeros(rows.shape[0] * _BINS, dtype=torch.int64, device=rows.device)
        total += rows.shape[1]
        for r in range(rows.shape[0]):  # one histogram per row (no widened row-offset copy of the digits)
            _accumulate_digits(hists[r * _BINS : (r + 1) * _BINS], keys[r], width, nonnegative)
    return hists, total, width or 32


def order_statistics(chunks: Chunks, ranks: Callable[[int], Sequence[Sequence[int]]]) -> list[list[float]]:
    """Exact order statistics of each row of a streamed ``[R, D]`` matrix.

    ``chunks()`` yields the columns in pieces (``[R, n_i]``, any float dtype; ranked as fp32, or as fp64 when any
    chunk is fp64, which costs one more pass); it is called once per pass. ``ranks(D)`` gives, for each row, the
    wanted 1-based ascending ranks (it receives the total column count D, known after the first pass). Returns the
    values, as ``[[value per rank] per row]``.
    """
    hists, total, width = _first_pass(chunks, None)
    if width == 0:  # fp32 and fp64 chunks: rank everything as fp64 (exact for both)
        hists, total, width = _first_pass(chunks, 64)
    wanted = [list(row) for row in ranks(total)]
    if hists is None:
        if any(wanted):
            raise ValueError("order_statistics: no data to select from")
        return [[] for _ in wanted]
    row_hists = hists.reshape(-1, _BINS)
    if len(wanted) != row_hists.shape[0]:
        raise ValueError(f"order_statistics: {len(wanted)} rank lists for {row_hists.shape[0]} rows")
    targets = [(r, k) for r, row in enumerate(wanted) for k in row]
    for _, k in targets:
        if not 1 <= k <= total:
            raise ValueError(f"order_statistics: rank {k} outside 1..{total}")
    # prefix: the signed key bits fixed so far (Python int); residual: rank inside the current bucket
    prefixes, residuals = [], []
    for r, k in targets:
        digit, residual = _pick(row_hists[r], k)
        prefixes.append(_signed_top(digit))
        residuals.append(residual)
    for level in range(1, width // _DIGIT_BITS):
        fixed_shift = width - _DIGIT_BITS * level  # bits at and above this position are fixed by the prefix
        shift = fixed_shift - _DIGIT_BITS
        level_hists = torch.zeros(len(targets) * _BINS, dtype=torch.int64, device=hists.device)
        for chunk in chunks():
            rows = chunk.reshape(chunk.shape[0], -1)
            if rows.shape[1] == 0:
                continue
            keys, nonnegative = _sortable(rows, width)
            for t, (r, _) in enumerate(targets):
                _accumulate_bucket(
                    level_hists[t * _BINS : (t + 1) * _BINS],
                    keys[r],
                    prefixes[t],
                    fixed_shift,
                    shift,
                    nonnegative,
                )
        level_hists = level_hists.reshape(-1, _BINS)
        for t in range(len(targets)):
            digit, residuals[t] = _pick(level_hists[t], residuals[t])
            prefixes[t] = (prefixes[t] << _DIGIT_BITS) | digit
    out: list[list[float]] = [[] for _ in wanted]
    for (r, _), key in zip(targets, prefixes):
        out[r].append(_key_to_float(key, width))
    return out


def local_order_statistics(rows: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """The in-memory counterpart: the given 1-based ascending ranks of each row of ``[R, n]``, as ``[R, len]``."""
    ordered = rows.sort(dim=1).values
    index = torch.tensor([k - 1 for k in ranks], dtype=torch.long, device=rows.device)
    return ordered[:, index]
