"""The PNG figures a generation leaves for people: ``grid.png``, ``budget.png`` and ``selection.png``.

Tiles are laid out by ``torchvision.utils.make_grid``; matplotlib (Agg) adds the class names and the budget
curves. Every figure is written atomically (:func:`ddkit.io.atomic_file`). :func:`ddkit.writecost.finish_seconds`
times :func:`write_grid` to reserve its cost inside the generation budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ddkit.io import atomic_file

if TYPE_CHECKING:
    import torch


def prepare_plotting() -> None:
    """Import matplotlib (Agg) while the budget still has slack, not after the last batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def grid_canvas(images: torch.Tensor, labels: torch.Tensor, rows: int, cols: int):
    """The tiles of :func:`write_grid`: row ``k`` holds the first ``cols`` images of class ``k``, white
    where a class has fewer; each tile sits in a ``(H+2) x (W+2)`` cell with a 1-pixel white border.

    Args:
        images: uint8 [N, C, H, W] with C 1 or 3 (grey repeated to RGB); labels: int64 [N].

    Returns:
        numpy uint8 [rows·(H+2), cols·(W+2), 3].
    """
    import numpy as np
    import torch
    from torchvision.utils import make_grid

    C, H, W = images.shape[1:] if len(images) else (1, 8, 8)
    if rows == 0:
        return np.full((0, cols * (W + 2), 3), 255, dtype=np.uint8)
    white = torch.full((C, H, W), 255, dtype=torch.uint8)
    tiles = []
    for k in range(rows):
        row = [images[n] for n in (labels == k).nonzero().flatten()[:cols].tolist()]
        tiles += row + [white] * (cols - len(row))
    # make_grid pads 2 pixels round the grid, the canvas 1; an extra white row keeps a lone tile padded
    # (make_grid returns a single image as is). Both are cropped off.
    grid = make_grid(torch.stack(tiles + [white] * cols), nrow=cols, padding=2, pad_value=255)
    grid = grid[:, 1 : 1 + rows * (H + 2), 1 : 1 + cols * (W + 2)]
    return np.ascontiguousarray(grid.permute(1, 2, 0).numpy())


def write_grid(
    path: Path, images, labels, classes: list[str], ipc: int, max_cols: int = 10, max_rows: int = 100
) -> Path:
    """PNG grid: one row per class (first ``max_rows`` classes), its first ``max_cols`` images, the class
    names on the left and ``IPC <ipc>`` above.

    Args:
        images: uint8 [N,C,H,W], class-major; labels: int64 [N].
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = min(len(classes), max_rows)
    cols = max(1, min(ipc, max_cols))
    H = images.shape[2] if len(images) else 8
    canvas = grid_canvas(images, labels, K, cols)
    fig_h = max(2.0, 0.5 * K)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * cols + 1.5), fig_h))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([k * (H + 2) + H / 2 for k in range(K)])
    ax.set_yticklabels([str(c)[:20] for c in classes[:K]], fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"IPC {ipc}")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_budget_plot(path: Path, shards: list[dict]) -> Path:
    """PNG: planned vs actual cumulative images over time (seconds since the budget start), per rank.

    Args:
        shards: the ranks' shard records (:func:`ddkit.generate.save_shard`): ``events``, ``plan``,
            ``cost``, ``plan_time``, ``deadline`` and ``margin_seconds`` (seconds since the budget start).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    limit = float(shards[0]["deadline"])  # the time limit
    for s in shards:
        ev = s["events"]
        p, c = s["plan"], s["cost"]
        per_batch = c["step_seconds"] * p["steps"] + c["batch_seconds"]
        t_start = ev[0]["start"] if ev else s["plan_time"]
        n_batches = p["batches_per_rank"]
        planned_t, planned_n, n = [t_start], [0], 0
        sizes = [e["images"] for e in ev] + [c["batch_size"]] * max(0, n_batches - len(ev))
        for b in range(n_batches):
            n += sizes[b] if b < len(sizes) else c["batch_size"]
            planned_t.append(t_start + (b + 1) * per_batch)
            planned_n.append(n)
        ax.plot(
            planned_t, planned_n, "--", label=f"rank {s['rank']} planned ({p['steps']} steps, IPC {p['ipc']})"
        )
        at, an, n = [t_start], [0], 0
        for e in ev:
            n += e["images"]
            at.append(e["end"])
            an.append(n)
        ax.plot(at, an, "-", marker=".", label=f"rank {s['rank']} actual")
    ax.axvline(limit, color="red", label="deadline")
    ax.axvline(
        limit - float(shards[0]["margin_seconds"]), color="orange", linestyle=":", label="safety margin"
    )
    ax.set_xlabel("seconds since budget start")
    ax.set_ylabel("images generated (this rank)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_selection_grid(path: Path, images: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                         ipc: int, max_rejected: int = 10, max_classes: int = 20) -> Path:
    """PNG: one row per class, its ``ipc`` chosen images, a blank, then up to ``max_rejected`` rejected ones.

    Args:
        images: uint8 [N, C, H, W] the pool; labels: int64 [N]; keep: int64 chosen indices.
    """
    import torch
    from torchvision.utils import make_grid, save_image

    kept = torch.zeros(labels.shape[0], dtype=torch.bool)
    kept[keep] = True
    k = min(int(labels.max()) + 1 if labels.numel() else 0, max_classes)
    cols = ipc + 1 + max_rejected
    blank = torch.zeros_like(images[0]) if images.numel() else torch.zeros(1, 8, 8, dtype=torch.uint8)
    tiles = []
    for c in range(k):
        chosen = list(images[keep[labels[keep] == c][:ipc]])
        rejected = images[(labels == c) & ~kept][:max_rejected]
        row = chosen + [blank] * (ipc - len(chosen)) + [blank] + list(rejected)
        row += [blank] * (cols - len(row))
        tiles += row
    grid = make_grid(torch.stack(tiles).float() / 255.0, nrow=cols, padding=2, pad_value=0.5)
    with atomic_file(path) as tmp:
        save_image(grid, tmp, format="png")
    return path
