"""Shared CLI plumbing: config loading with ``--set``, one-line errors, the rich console."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console

from ddkit import progress
from ddkit.config import absolute_paths, load_config
from ddkit.errors import DdkitError
from ddkit.hardware import configure_threads

console = Console()
#: The one stderr console (:func:`ddkit.progress.console`): CLI errors and the library's bars and notes.
err_console = progress.console()

F = TypeVar("F", bound=Callable[..., Any])

# Reused option declarations so every command spells them the same way.
SetOption = typer.Option(
    None, "--set", "-s", help="Override a config key: --set generate.cfg_scale=2.0 (repeatable)."
)
ConfigArg = typer.Option(None, "--config", "-c", help="Experiment YAML (configs/*.yaml); default: embedded MNIST-5k.")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one red line to stderr and return an Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn :class:`DdkitError` (and a few OS errors) into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DdkitError as e:
            raise fail(str(e)) from None
        except FileNotFoundError as e:
            raise fail(f"{e.filename or e}: not found") from None
        except KeyboardInterrupt:
            raise fail("interrupted; outputs written so far are complete, rerun to resume", 130) from None

    return wrapper  # type: ignore[return-value]


def load(config: Optional[Path], sets: Optional[list[str]]):
    """Load the experiment config (``ddkit.config.load_config``) from CLI arguments, its relative paths made
    absolute (``ddkit.config.absolute_paths``) so the records it writes work from any directory, and size
    torch's thread pool for the stage command about to run (:func:`ddkit.hardware.configure_threads`)."""

    cfg = absolute_paths(load_config(config, tuple(sets or ())))
    configure_threads()
    return cfg


def is_tty() -> bool:
    return sys.stderr.isatty()
