"""The cellplug plugin of the bridge: ``cellplug cellprofiler install-plugin | uninstall-plugin``.

CellProfiler loads plugin modules from one folder (Preferences > "CellProfiler plugins
directory", or ``--plugins-directory`` headless). ``install-plugin DIR`` writes the one-file
plugin ``runcellplug.py`` there; ``uninstall-plugin DIR`` removes it again. Neither imports
CellProfiler, so they work from any Python; the file only loads in a CellProfiler whose
Python has this package installed, which ``install-plugin`` checks and warns about.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import click

from cellplug import hookimpl
from cellplug.errors import CellplugError

PLUGIN_FILE = "runcellplug.py"
MARKER = "# cellplug-cellprofiler plugin file"


def plugin_source() -> str:
    """The text of the one-file plugin (``cellplug_cellprofiler/runcellplug.py``)."""
    return (Path(__file__).with_name(PLUGIN_FILE)).read_text(encoding="utf-8")


def _is_ours(path: Path) -> bool:
    try:
        return MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def install_plugin(directory: Path, force: bool = False) -> tuple[Path, str]:
    """Write the plugin file into ``directory`` (created if missing).

    Returns the path and what happened: "installed", "updated" or "unchanged". A
    ``runcellplug.py`` that this package did not write is replaced only with ``force``.
    """
    if directory.exists() and not directory.is_dir():
        raise CellplugError(f"{directory}: not a folder")
    target = directory / PLUGIN_FILE
    text = plugin_source()
    status = "installed"
    if target.exists():
        if target.is_file() and target.read_text(encoding="utf-8", errors="replace") == text:
            return target, "unchanged"
        if not _is_ours(target) and not force:
            raise CellplugError(
                f"{target}: exists and was not written by cellplug-cellprofiler; not replaced "
                f"(use --force to replace it)")
        status = "updated"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".runcellplug-", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        raise CellplugError(f"{target}: cannot write ({exc.strerror or exc})") from None
    _remove_bytecode(directory)
    return target, status


def uninstall_plugin(directory: Path) -> tuple[Path, bool]:
    """Remove the plugin file from ``directory``; (path, whether there was one to remove).

    A ``runcellplug.py`` this package did not write is left alone (an error).
    """
    target = directory / PLUGIN_FILE
    if not target.exists():
        return target, False
    if not _is_ours(target):
        raise CellplugError(f"{target}: was not written by cellplug-cellprofiler; left alone")
    try:
        target.unlink()
    except OSError as exc:
        raise CellplugError(f"{target}: cannot remove ({exc.strerror or exc})") from None
    _remove_bytecode(directory)
    return target, True


def _remove_bytecode(directory: Path) -> None:
    """Stale ``__pycache__/runcellplug.*.pyc`` would outlive the source file's removal."""
    for pyc in (directory / "__pycache__").glob("runcellplug.*.pyc"):
        try:
            pyc.unlink()
        except OSError:
            pass


def host_problem() -> str | None:
    """Why this Python cannot run the module in CellProfiler, or None."""
    if importlib.util.find_spec("cellprofiler_core") is None:
        return (f"CellProfiler (cellprofiler_core) is not installed in this Python "
                f"({sys.executable}); the plugin only loads in a CellProfiler whose Python has "
                f"cellplug and cellplug-cellprofiler installed")
    return None


@click.group("cellprofiler")
def cellprofiler() -> None:
    """CellProfiler bridge: install the RunCellplug module into a plugins folder."""


@cellprofiler.command("install-plugin")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True,
              help="Replace a runcellplug.py that cellplug-cellprofiler did not write.")
def install_plugin_cmd(directory: Path, force: bool) -> None:
    """Write runcellplug.py (the RunCellplug module) into CellProfiler's plugins folder DIRECTORY.

    Then set that folder as "CellProfiler plugins directory" in CellProfiler's preferences (or
    pass --plugins-directory DIRECTORY headless) and restart CellProfiler.
    """
    target, status = install_plugin(directory, force)
    click.echo(f"{status}: {target}")
    problem = host_problem()
    if problem:
        click.echo(f"warning: {problem}", err=True)
    click.echo(f"In CellProfiler, set Preferences > CellProfiler plugins directory to "
               f"{directory.resolve()} and restart; headless: --plugins-directory "
               f"{directory.resolve()}", err=True)


@cellprofiler.command("uninstall-plugin")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def uninstall_plugin_cmd(directory: Path) -> None:
    """Remove runcellplug.py from the plugins folder DIRECTORY (restart CellProfiler after)."""
    target, removed = uninstall_plugin(directory)
    click.echo(f"removed: {target}" if removed else f"not installed: {target} does not exist")


@hookimpl
def register_commands(register):
    register("cellprofiler", cellprofiler)
