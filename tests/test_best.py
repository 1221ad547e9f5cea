"""``generate.method: best`` (ddkit.methods.best): the measured winner at the run's IPC, from the quality tables."""

from __future__ import annotations

import pytest
import yaml

from ddkit.budget import load_quality_table
from ddkit.config import load_config
from ddkit.errors import ConfigError
from ddkit.methods import registry
from ddkit.methods.best import choose, resolve


def _table(path, method, rows):
    path.write_text(yaml.safe_dump({"method": method, "rows": [
        {"steps": s, "ipc": i, "ratio": r, "accuracy": a} for s, i, r, a in rows]}))
    return str(path), load_quality_table(path)


def test_best_picks_the_highest_measured_row_per_ipc(tmp_path):
    tables = [
        _table(tmp_path / "quality.yaml", "dit", [(50, 1, 1, 40.0), (50, 10, 1, 88.0), (50, 10, 4, 91.0)]),
        _table(tmp_path / "quality-d3hr.yaml", "d3hr", [(32, 1, 1, 55.0), (32, 10, 1, 80.0)]),
        _table(tmp_path / "quality-mgd3.yaml", "mgd3", [(50, 1, 1, 50.0), (50, 10, 1, 94.1), (30, 10, 1, 93.0)]),
    ]
    assert choose(tables, 1)[:2] == ("d3hr", str(tmp_path / "quality-d3hr.yaml"))
    name, path, why = choose(tables, 10)
    assert (name, path) == ("mgd3", str(tmp_path / "quality-mgd3.yaml"))
    assert "94.1 % at 50 steps" in why and "dit+select 91.0 %" in why and "d3hr 80.0 %" in why
    assert choose(tables[:1], 10)[0] == "dit+select"  # a ratio-4 row scored the +select wrapper
    with pytest.raises(ConfigError, match=r"IPCs measured: \[1, 10\]"):
        choose(tables, 50)


@pytest.mark.parametrize("ipc, winner, table", [
    (1, "d3hr", "quality-d3hr.yaml"), (10, "dit+select", "quality.yaml"), (50, "mgd3", "quality-mgd3.yaml")])
def test_best_on_the_demo_picks_the_measured_winner_at_each_ipc(ipc, winner, table):
    """The demo ships one table per method (ddkit/assets/mnist-dit-t4/quality*.yaml, bench/quality.py): at
    IPC 1 D^3HR 70.7 % against MGD^3 70.2, at IPC 10 dit+select (ratio 4) 92.9 against MGD^3 91.8, at IPC 50
    MGD^3 96.7 against dit+select 94.6 (README, "Generation methods")."""
    cfg = load_config("configs/mnist.yaml", ["generate.method=best", f"generate.ipc_min={ipc}",
                                             f"generate.ipc_max={ipc}"])  # fmt: skip
    name, quality, why = registry.resolve("best", cfg)
    assert name == winner and quality == f"ddkit:mnist-dit-t4/{table}"
    assert why.startswith(f"best at IPC {ipc}: {winner}, ")
    assert registry.build("best", cfg).name == winner


def test_best_resolves_from_the_shipped_tables_and_says_why():
    cfg = load_config("configs/mnist.yaml", ["generate.method=best"])
    name, quality, why = registry.resolve("best", cfg)
    assert quality.startswith("ddkit:mnist-dit-t4/quality")
    assert why.startswith("best at IPC 10: ") and "mgd3 91.8 %" in why  # the runners-up are named
    with pytest.raises(ConfigError, match="pin generate.ipc_min"):
        resolve(load_config("configs/mnist.yaml", ["generate.method=best", "generate.ipc_min=1"]))
    with pytest.raises(ConfigError, match="'dsr'"):
        resolve(load_config(None, ["generate.method=best", "generate.ipc_min=10", "generate.quality=dsr"]))
    assert "best" not in registry.names()  # a pseudo-method: the invariance matrix covers what it resolves to
