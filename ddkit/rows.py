"""Row storage on disk: sets and pools of any size written with bounded anonymous memory.

A distilled set or a ``+select`` pool is rows of uint8 images (ImageNet-1K, IPC 50, ratio 4 at 256 px: 39 GB).
Both helpers here keep the rows in a *shared memory map of an unlinked file*: its pages are page cache, which
the kernel writes back and drops under pressure, so the rows never count as the process's anonymous memory,
``torch.save`` writes them as any tensor, and the file's blocks are freed when the tensor is. The file is
unlinked as soon as it is mapped, so a crash leaves nothing behind. Linux (``/proc/self/fd``) is assumed, as
everywhere ddkit runs.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

GATHER_ROWS = 1024  # rows copied per chunk by gather_rows: the only anonymous memory it needs


def gather_rows(sources: list[Any], keep: Any, scratch_dir: str | Path) -> Any:
    """``torch.cat(sources)[keep]`` without the concatenation in memory: rows are copied source by source,
    :data:`GATHER_ROWS` at a time, into a tensor on disk (module docstring), so gathering a set of any size
    from memory-mapped sources (``torch.load(mmap=True)``) adds one chunk of anonymous memory.

    Args:
        sources: tensors [N_i, *S] of one dtype and row shape S; keep: int64 [M] indices into their
            concatenation; scratch_dir: a directory on a disk with room for the M rows.

    Returns:
        [M, *S] tensor, the rows in ``keep``'s order.

    Raises:
        IndexError: an index outside the concatenation.
    """
    import torch

    total = sum(int(s.shape[0]) for s in sources)
    if len(keep) and (int(keep.min()) < 0 or int(keep.max()) >= total):
        raise IndexError(f"gather_rows: indices outside [0, {total})")
    shape, dtype = (len(keep), *sources[0].shape[1:]), sources[0].dtype
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    out = RowSpool(scratch_dir, shape[1:], dtype, capacity=shape[0]).grow_to(shape[0])
    start = 0
    for src in sources:
        n = int(src.shape[0])
        pos = torch.nonzero((keep >= start) & (keep < start + n)).flatten()
        for c in range(0, len(pos), GATHER_ROWS):
            p = pos[c : c + GATHER_ROWS]
            out[p] = src[keep[p] - start]
        start += n
    return out




class RowSpool:
    """An append-only [N, *row_shape] tensor on disk (module docstring): :meth:`append` batches, :meth:`rows`
    is a view of the first N rows. Capacity doubles when full (the file grows and is mapped again; the rows
    already written are in the file), so appending B rows needs B rows of anonymous memory, at any N.

    Args:
        scratch_dir: a directory on a disk with room for the rows; row_shape: e.g. (C, H, W);
        dtype: the rows' dtype (uint8 for images); capacity: rows mapped at first.

    Raises:
        OSError: the scratch file cannot be made or grown (a full disk: :meth:`append`).
    """

    def __init__(self, scratch_dir: str | Path, row_shape: tuple[int, ...], dtype: Any, capacity: int = 256) -> None:
        import torch

        self.row_shape, self.dtype, self._n = tuple(row_shape), dtype, 0
        self._row_bytes = math.prod(self.row_shape) * torch.empty(0, dtype=dtype).element_size()
        fd, path = tempfile.mkstemp(prefix=".rows-", dir=scratch_dir)
        os.unlink(path)  # the descriptor keeps the inode until the last mapping goes
        self._fd = fd
        self._buf = self._map(max(1, capacity))

    def _map(self, rows: int):
        import torch

        os.ftruncate(self._fd, rows * self._row_bytes)
        flat = torch.from_file(f"/proc/self/fd/{self._fd}", shared=True, size=rows * math.prod(self.row_shape),
                               dtype=self.dtype)  # fmt: skip
        return flat.view(rows, *self.row_shape)

    def grow_to(self, rows: int):
        """Map at least ``rows`` rows; returns the whole mapped tensor [capacity, *row_shape]."""
        if rows > self._buf.shape[0]:
            self._buf = self._map(rows)
        return self._buf

    def append(self, batch) -> None:
        """Copy ``batch`` [B, *row_shape] after the rows written so far."""
        n = self._n + int(batch.shape[0])
        if n > self._buf.shape[0]:
            self.grow_to(max(n, 2 * self._buf.shape[0]))
        self._buf[self._n : n] = batch
        self._n = n

    def rows(self):
        """[N, *row_shape]: the rows appended, a view of the mapping (valid after :meth:`close`)."""
        return self._buf[: self._n]

    def __len__(self) -> int:
        return self._n

    def close(self) -> None:
        """Close the descriptor; the mapping, and the rows, live as long as tensors refer to them."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
