"""An evaluation's report: per-set summaries, DD-Ranking, the challenge scorer's printout and the tables.

Accuracies are in percent, summarised as mean ± std over repeats (population std, as D^3HR's ``np.std``).
Files written into the evaluation directory: ``results.json`` (``{"sets": ..., "meta": ...}``), ``table.md``,
and for eccv2024 ``scorer_log.txt`` (the scorer's printout) and ``scores.txt`` (its one official line).
Printed lines and the table go to stdout (progress bars go to stderr, :mod:`ddkit.progress`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

from ddkit.evaluate.protocols import ECCV2024Protocol, Protocol
from ddkit.io import atomic_write_json, atomic_write_text
from ddkit.package import SCORES_FILE, write_official_scores

if TYPE_CHECKING:
    from ddkit.evaluate.runs import TrainSet

_CONSOLE = None


def _console():
    """One shared stdout console for the scorer's lines and the table (stdout stays the report)."""
    global _CONSOLE

    if _CONSOLE is None:
        _CONSOLE = Console()
    return _CONSOLE


def _fraction(percent: float, n: int) -> float:
    """The scorer's accuracy ``correct / n`` recovered exactly from a percentage of ``n`` test images."""
    return round(percent * n / 100.0) / n if n else 0.0


class Report:
    """Collects each set's repeats into ``results`` (in training order) and the eccv2024 scorer's printout.

    Args:
        protocol, network: what the students were trained with.
        n_test: images in the real test split (the scorer's fractions are ``correct / n_test``).
        progress: also print the scorer's lines and, at the end, the table.
    """

    def __init__(self, protocol: Protocol, network: str, n_test: int, progress: bool) -> None:
        self.protocol, self.network, self.n_test, self.progress = protocol, network, n_test, progress
        self.results: dict[str, dict] = {}
        self.scorer_lines: list[str] = []
        self.scorer_perf: float | None = None  # the scorer's performance of the first distilled set

    def _say(self, line: str) -> None:
        self.scorer_lines.append(line)
        if self.progress:
            _console().print(line, highlight=False)

    def add(self, s: TrainSet, epochs: int, runs: Iterable[tuple[dict, int]]) -> None:
        """Summarise set ``s`` from its repeats ``runs`` (``(RunResult.to_dict(), training images)``,
        consumed here in order); ``mean`` is the final accuracy for eccv2024, the best for idc/rded (as
        their sources report), ``last_*`` the final accuracy for all."""
        eccv = isinstance(self.protocol, ECCV2024Protocol)
        finals, bests, secs = [], [], []
        n_images = 0
        for res, images in runs:
            n_images = images
            finals.append(float(res["final"]))
            bests.append(float(res["best"]))
            secs.append(float(res["seconds"]))
            if eccv:
                # The scorer prints each round's accuracy as a fraction: print(acc_test).
                self._say(str(_fraction(res["final"], self.n_test)))
        main = finals if eccv else bests
        self.results[s.name] = {
            "mean": float(np.mean(main)),
            "std": float(np.std(main)),
            "runs": main,
            "ipc": s.ipc,
            "protocol": self.protocol.name,
            "network": self.network,
            "epochs": epochs,
            "images": n_images,
            "last_mean": float(np.mean(finals)),
            "last_std": float(np.std(finals)),
            "last_runs": finals,
            "seconds": float(np.sum(secs)),
            "kind": s.kind,
        }
        if eccv:
            # The scorer sums the per-round fractions and divides by the number of rounds.
            score = 0.0
            for f in finals:
                score += _fraction(f, self.n_test)
            line = f"Performance on {s.name} dataset is {score / len(finals)}"
            if self.scorer_perf is None and s.kind == "distilled":
                self.scorer_perf = score / len(finals)
            self._say(line)

    def rank(self) -> None:
        """Add DD-Ranking's metrics to the distilled sets when both baselines were trained."""
        if "random_real" in self.results and "full" in self.results:
            _dd_ranking(self.results)

    def write(self, out: Path, meta: dict, dataset: str | None) -> None:
        """Write ``results.json`` (with ``meta``), ``table.md``, the scorer's files (``dataset``: the name in
        ``scores.txt``), and print the table when ``progress``."""

        atomic_write_json(out / "results.json", {"sets": self.results, "meta": meta})
        atomic_write_text(out / "table.md", table_markdown(self.results, self.protocol, self.network))
        if self.scorer_lines:
            # scores.txt as the official scorer writes it (one line, ddkit.package.official_scores); its
            # printout (per-round fractions, per-set lines) goes to scorer_log.txt.
            atomic_write_text(out / "scorer_log.txt", "\n".join(self.scorer_lines) + "\n")
        if self.scorer_perf is not None:

            write_official_scores(out / SCORES_FILE, {str(dataset): self.scorer_perf})
        if self.progress:
            _console().print(rich_table(self.results, self.protocol, self.network))


def _dd_ranking(results: dict[str, dict]) -> None:
    """Add DD-Ranking's hard-label recovery and improvement over random to each distilled set, per repeat:
    ``HLR = acc(full) - acc(set)``, ``IOR = acc(set) - acc(random_real)`` (percentage points; mean and
    population std over repeats). Source: NUS-HPC-AI-Lab/DD-Ranking ``ddranking/metrics/hard_label.py``
    (``compute_metrics``). Their composite LRS/ARS scores are not computed here."""
    full, rnd = results["full"]["runs"], results["random_real"]["runs"]
    for r in results.values():
        if r["kind"] != "distilled":
            continue
        n = min(len(full), len(rnd), len(r["runs"]))
        hlr = [full[i] - r["runs"][i] for i in range(n)]
        ior = [r["runs"][i] - rnd[i] for i in range(n)]
        r["dd_ranking"] = {
            "hlr_mean": float(np.mean(hlr)),
            "hlr_std": float(np.std(hlr)),
            "ior_mean": float(np.mean(ior)),
            "ior_std": float(np.std(ior)),
        }


def _rows(
    results: dict[str, dict], protocol: Protocol, with_runs: bool = True
) -> tuple[list[str], list[list[str]]]:
    two = not isinstance(protocol, ECCV2024Protocol)
    dd = any("dd_ranking" in r for r in results.values())
    head = ["Set", "IPC", "Images", "Epochs", "Best acc. (%)" if two else "Acc. (%)"]
    if two:
        head.append("Last acc. (%)")
    if with_runs:
        head.append("Runs")
    if dd:
        head += ["IOR (pp)", "HLR (pp)"]
    rows = []
    for name, r in results.items():
        row = [name, str(r["ipc"]), str(r["images"]), str(r["epochs"]), f"{r['mean']:.2f} ± {r['std']:.2f}"]
        if two:
            row.append(f"{r['last_mean']:.2f} ± {r['last_std']:.2f}")
        if with_runs:
            row.append(", ".join(f"{v:.1f}" for v in r["runs"]))
        if dd:
            d = r.get("dd_ranking")
            row += [f"{d['ior_mean']:+.2f}", f"{d['hlr_mean']:+.2f}"] if d else ["", ""]
        rows.append(row)
    return head, rows


def table_markdown(results: dict[str, dict], protocol: Protocol, network: str) -> str:
    """The results as a Markdown table (what ``table.md`` holds)."""
    head, rows = _rows(results, protocol)
    lines = [
        f"Protocol `{protocol.name}`, {network}; accuracy on the real test split, mean ± std over repeats.",
        "",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rich_table(results: dict[str, dict], protocol: Protocol, network: str):
    """The results as a :class:`rich.table.Table`."""

    head, rows = _rows(results, protocol, with_runs=False)
    t = Table(title=f"ddkit evaluate — {protocol.name}, {network}")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    return t
