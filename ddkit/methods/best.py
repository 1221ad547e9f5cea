"""``generate.method: best``: the method with the highest measured accuracy at the run's IPC.

A pseudo-method, resolved before anything is built (:func:`ddkit.methods.registry.resolve`): the quality
tables shipped beside ``generate.quality`` (every ``quality*.yaml`` in its directory, e.g.
``ddkit/assets/mnist-dit-t4/``; ``bench/quality.py`` writes one per method, each naming the ``method`` whose
samples it scored) are read, and at the run's IPC the (method, steps, ratio) row with the highest accuracy
wins. A row with ratio r > 1 scored ``<method>+select`` (r × IPC candidates, IPC kept). The winner then plans
from its own table (``generate.quality`` is set to it) and the plan's reason says what was chosen and why.
"""

from __future__ import annotations

from pathlib import Path

from ddkit.assets import asset_path
from ddkit.budget import load_quality_table
from ddkit.errors import ConfigError, WeightsError

BEST = "best"


def table_paths(quality: str) -> list[str]:
    """The tables beside ``quality`` (a file or ``ddkit:NAME/FILE``): every ``quality*.yaml`` in its folder,
    sorted by name, in the same spelling (``ddkit:NAME/other.yaml`` for a shipped table).

    Raises:
        ConfigError: ``quality`` is ``dsr`` or not a file.
    """

    if quality == "dsr":
        raise ConfigError("generate.method: 'best' picks from measured quality tables; generate.quality is 'dsr'")
    try:
        p = Path(asset_path(quality))
    except WeightsError as e:
        raise ConfigError(f"generate.quality: {e}") from None
    if not p.is_file():
        raise ConfigError(f"generate.quality: table file {p} not found")
    prefix = quality[: len(quality) - len(Path(quality).name)]
    return [prefix + q.name for q in sorted(p.parent.glob("quality*.yaml"))]


def choose(tables: list[tuple[str, dict]], ipc: int) -> tuple[str, str, str]:
    """The best measured (method, table) at ``ipc``.

    Args:
        tables: (path, :class:`ddkit.budget.QualityTable`) pairs; a table without ``measured_with`` is
            skipped (its rows cannot be attributed to a method).

    Returns:
        (method name, the path of its table, the reason: the winner's row and the runners-up).

    Raises:
        ConfigError: no attributed table has a row at ``ipc`` (names the IPCs measured).
    """
    best: dict[str, tuple[float, int, float, str]] = {}
    seen: set[int] = set()
    for path, table in tables:
        base = getattr(table, "measured_with", None)
        if base is None:
            continue
        for key, acc in table.items():
            steps, n, ratio = key[0], key[1], (key[2] if len(key) > 2 else 1.0)
            seen.add(n)
            if n != ipc:
                continue
            name = base.split("+")[0] + ("+select" if ratio > 1 else "")
            if name not in best or acc > best[name][0]:
                best[name] = (float(acc), int(steps), float(ratio), path)
    if not best:
        raise ConfigError(f"generate.method: 'best' found no measured method at IPC {ipc} in "
                          f"{[p for p, _ in tables]} (IPCs measured: {sorted(seen)})")
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])
    name, (acc, steps, ratio, path) = ranked[0]
    others = ", ".join(f"{m} {a:.1f} %" for m, (a, *_) in ranked[1:]) or "no other method measured"
    why = (f"best at IPC {ipc}: {name}, {acc:.1f} % at {steps} steps, ratio {ratio:g} in {path} "
           f"(others: {others})")
    return name, path, why


def resolve(cfg) -> tuple[str, str, str]:
    """(method, quality table, reason) that ``best`` stands for in the experiment ``cfg``.

    Raises:
        ConfigError: the IPC is not pinned (``ipc_min`` != ``ipc_max``), or as :func:`table_paths` and
            :func:`choose`.
    """

    g = cfg.generate
    if g.ipc_min != g.ipc_max:
        raise ConfigError(f"generate.method: 'best' picks per IPC; pin generate.ipc_min = generate.ipc_max "
                          f"(got {g.ipc_min}..{g.ipc_max})")
    tables = [(p, load_quality_table(p)) for p in table_paths(g.quality)]
    return choose(tables, g.ipc_min)
