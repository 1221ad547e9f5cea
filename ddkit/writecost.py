"""What writing results costs on THIS filesystem, measured inside the budget instead of assumed.

A time-budgeted job must stop sampling early enough to save what it made. How long that takes depends on
the filesystem (a local NVMe disk or a parallel filesystem under load) and on the size of the files, so
:func:`measure` times the real writers (:func:`ddkit.io.atomic_write_bytes` for a small file,
:func:`ddkit.io.atomic_torch_save` for a probe tensor) in the output directory, and :meth:`WriteCost.seconds`
turns that into the time a list of future writes will take. Used for generation's reserve
(:func:`finish_seconds`, :mod:`ddkit.generate`) and the challenge entry point's write reserve (:mod:`ddkit.challenge`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ddkit import io
from ddkit.figures import write_grid

#: Largest probe tensor written (bytes); bigger outputs are charged linearly from it. 16 MB is a tenth
#: of a second on a local disk and shows a parallel filesystem's bandwidth without costing much budget.
PROBE_MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class WriteCost:
    """Measured write costs (seconds): ``file_s`` per small atomic file (open, fsync, rename), and
    ``probe_s`` for an atomic ``torch.save`` of ``probe_bytes`` bytes."""

    file_s: float
    probe_s: float
    probe_bytes: int

    def seconds(self, files: int = 0, tensor_bytes: tuple[int, ...] = ()) -> float:
        """Predicted seconds for ``files`` small atomic files plus one atomic ``torch.save`` per entry of
        ``tensor_bytes`` (its size in bytes): the probe's time, scaled linearly above the probe's size (so
        never below one probe's fixed cost)."""
        per = [self.probe_s * max(1.0, n / max(1, self.probe_bytes)) for n in tensor_bytes]
        return files * self.file_s + sum(per)


def measure(directory: str | Path, nbytes: int, clock: Callable[[], float] = time.monotonic) -> WriteCost:
    """Time one small atomic file and one atomic ``torch.save`` of ``min(nbytes, PROBE_MAX_BYTES)`` bytes
    (at least 1 KiB) in ``directory`` with the real writers, then delete both.

    Args:
        directory: where the outputs will go (created).
        nbytes: size of the largest output expected (bytes).
        clock: monotonic seconds.

    Returns:
        The :class:`WriteCost`.
    """
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    small = directory / ".writecost-probe.json"
    big = directory / ".writecost-probe.pt"
    size = int(max(1024, min(nbytes, PROBE_MAX_BYTES)))
    probe = torch.full((size,), 7, dtype=torch.uint8)  # constant: no compression anywhere makes it cheaper
    try:
        t = clock()
        io.atomic_write_text(small, "{}\n")
        file_s = clock() - t
        t = clock()
        io.atomic_torch_save(probe, big)
        probe_s = clock() - t
    finally:
        small.unlink(missing_ok=True)
        big.unlink(missing_ok=True)
    return WriteCost(file_s=file_s, probe_s=probe_s, probe_bytes=size)


def finish_seconds(
    gen_dir: str | Path,
    *,
    shard_bytes: int,
    merged_bytes: int,
    merges: bool,
    grid: tuple[int, int, int],
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Seconds this rank needs after its last batch, measured now on this machine and filesystem.

    The real writers are timed in ``gen_dir`` (:func:`measure`): the shard (``shard_bytes``
    of uint8 images) and its DONE; when this rank ``merges``: reading the shards and writing ``dataset.pt``
    (``merged_bytes`` each), manifest and DONE, and ``grid.png`` rendered now at its final size
    ``grid = (rows, cols, pixels per image)`` (the budget plot, a figure of the same kind, is charged the
    same).

    Returns:
        Seconds (the runner's ``reserve_seconds``).
    """

    import torch

    gen_dir = Path(gen_dir)
    wc = measure(gen_dir, max(shard_bytes, merged_bytes if merges else 0), clock)
    total = wc.seconds(files=1, tensor_bytes=(shard_bytes,))
    if merges:
        rows, cols, px = grid
        side = max(1, int(math.isqrt(max(1, px))))
        t = clock()
        probe = gen_dir / ".writecost-grid.png"
        write_grid(probe, torch.zeros(rows * cols, 1, side, side, dtype=torch.uint8),
                   torch.arange(rows).repeat_interleave(cols), [str(k) for k in range(rows)], cols)  # fmt: skip
        probe.unlink(missing_ok=True)
        total += 2 * (clock() - t) + wc.seconds(files=2, tensor_bytes=(merged_bytes, merged_bytes))
    return total


__all__ = ["PROBE_MAX_BYTES", "WriteCost", "finish_seconds", "measure"]
