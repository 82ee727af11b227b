"""The cellplug plugin of the bridge: ``cellplug fiji start | install | uninstall`` and the two
commands the standalone macros run, ``cellplug fiji segment | train``.

``segment`` and ``train`` exchange files with a macro through one folder (``--out``):
``segment`` writes ``labels.tif`` (ImageJ hyperstack, 16-bit or 32-bit float labels with the
input's calibration) and ``RoiSet.zip`` (when there are objects); ``train`` writes
``model.txt``. When either fails it writes its error line to ``error.txt`` there as well as
to stderr, since ImageJ's ``exec()`` returns standard output only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from cellplug import hookimpl
from cellplug.errors import CellplugError

from . import commands, convert

CHANNELS = click.option("--channels", nargs=2, type=click.IntRange(min=0), default=(0, 0),
                        show_default=True, help="Cyto and nucleus channel (0 = grey / none).")


@click.group("fiji")
def fiji() -> None:
    """Fiji / ImageJ bridge: a Plugins > Cellplug menu (segment, train from the ROI Manager)."""


@fiji.command("start")
@click.option("--fiji-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              envvar="CELLPLUG_FIJI_DIR",
              help="A Fiji.app to start through pyimagej (env CELLPLUG_FIJI_DIR); default: "
                   "plain ImageJ 1.x from an ij.jar.")
@click.option("--ij-jar", type=click.Path(exists=True, path_type=Path),
              envvar="CELLPLUG_IJ_JAR",
              help="The ImageJ 1.x jar (env CELLPLUG_IJ_JAR; default: Debian's "
                   "/usr/share/java/ij.jar or another usual place).")
@click.argument("images", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def start_cmd(fiji_dir: Path | None, ij_jar: Path | None, images: tuple[Path, ...]) -> None:
    """Start ImageJ (or Fiji) in this process with a Plugins > Cellplug menu whose commands
    run cellplug here, and open IMAGES. Returns when ImageJ is closed."""
    from . import imagej1

    bridge = imagej1.start(fiji_dir, ij_jar)
    from ij import IJ  # type: ignore

    for image in images:
        IJ.open(str(image.resolve()))
    click.echo(f"{bridge.host.name} is running with Plugins > Cellplug; close its window (or "
               f"Ctrl-C here) to stop", err=True)
    try:
        imagej1.wait_until_closed()
    except KeyboardInterrupt:
        pass


@fiji.command("install")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cellplug", "cellplug_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The cellplug executable the macros run (default: this environment's).")
@click.option("--force", is_flag=True, help="Replace files cellplug-fiji did not write.")
def install_cmd(path: Path, cellplug_path: Path | None, force: bool) -> None:
    """Write Plugins > Cellplug > Segment and > Train from ROI Manager into the Fiji (or
    ImageJ 1.x) folder PATH (its plugins/Cellplug/); restart Fiji to see them."""
    from . import standalone

    for target in standalone.install(path, cellplug_path, force):
        click.echo(f"wrote {target}")
    click.echo(f"The macros run {cellplug_path or standalone.cellplug_executable()}; restart "
               f"Fiji (or Help > Refresh Menus) to see Plugins > Cellplug", err=True)


@fiji.command("uninstall")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def uninstall_cmd(path: Path) -> None:
    """Remove the Cellplug macros from the Fiji (or ImageJ) folder PATH."""
    from . import standalone

    removed = standalone.uninstall(path)
    for target in removed:
        click.echo(f"removed {target}")
    if not removed:
        click.echo(f"not installed in {path}")


@contextlib.contextmanager
def _errors_to(folder: Path, image: Path | None = None) -> Iterator[None]:
    """On failure, the error line also goes to ``folder/error.txt`` (for the macro); an
    error about the pixels that does not say which file gets ``image``'s name in front."""
    try:
        yield
    except CellplugError as exc:
        text = " ".join(str(exc).split())
        if image is not None and str(image) not in text and image.name not in text:
            exc = CellplugError(f"{image}: {text}")
            text = str(exc)
        _write_error(folder, f"error: {text}")
        raise exc from None
    except Exception as exc:
        _write_error(folder, f"error: internal error (a bug, please report it): "
                             f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        raise


def _write_error(folder: Path, line: str) -> None:
    with contextlib.suppress(OSError):
        (folder / "error.txt").write_text(line + "\n", encoding="utf-8")


@fiji.command("segment")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder for labels.tif, RoiSet.zip (and error.txt).")
@click.option("--model", default=commands.defaults(commands.SEGMENT)["model"], show_default=True)
@click.option("--diameter", type=float, default=0.0, show_default=True,
              help="Object diameter in pixels; 0 estimates it.")
@CHANNELS
@click.option("--flow-threshold", type=float, default=0.4, show_default=True)
@click.option("--cellprob-threshold", type=float, default=0.0, show_default=True)
def segment_cmd(image: Path, out_dir: Path, model: str, diameter: float,
                channels: tuple[int, int], flow_threshold: float,
                cellprob_threshold: float) -> None:
    """Segment an ImageJ TIFF (every time point and slice) for the Segment macro: writes
    OUT/labels.tif and OUT/RoiSet.zip."""
    from cellplug.io import atomic_paths

    values = {"model": model, "diameter": diameter, "cyto": channels[0],
              "nucleus": channels[1], "flow": flow_threshold, "cellprob": cellprob_threshold}
    with _errors_to(out_dir):  # settings and model first: their errors are not the image's
        commands.segment_options(values)
        commands.segmenter_for(model)
    with _errors_to(out_dir, image):
        data, meta = convert.read_imagej_tiff(image)
        labels = commands.segment_image(data, values)
        rois = convert.labels_to_rois(labels, meta.n_channels)
        targets = [out_dir / "labels.tif"] + ([out_dir / "RoiSet.zip"] if rois else [])
        with atomic_paths(targets) as temps:  # both or neither
            convert.write_label_tiff(temps[0], labels, meta)
            if rois:
                convert.write_roiset(temps[1], rois)
        click.echo(f"{image}: {len(rois)} objects -> {targets[0]}")


@fiji.command("train")
@click.argument("image", type=click.Path(path_type=Path))
@click.argument("rois", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder for model.txt (and error.txt).")
@click.option("--base", default=commands.defaults(commands.TRAIN)["base"], show_default=True)
@click.option("--name", default="", help="New model's name (default: <base>-fiji-N).")
@click.option("--epochs", type=click.IntRange(min=1), default=100, show_default=True)
@CHANNELS
@click.option("--current", nargs=2, type=click.IntRange(min=1), default=(1, 1),
              show_default=True, help="Frame and slice that ROIs without a position belong to.")
@click.option("--stem", default=None, help="The image's name in the model's lineage "
                                           "(default: IMAGE's file name).")
def train_cmd(image: Path, rois: Path, out_dir: Path, base: str, name: str, epochs: int,
              channels: tuple[int, int], current: tuple[int, int], stem: str | None) -> None:
    """Fine-tune BASE on an ImageJ TIFF and its ROI set (for the Train from ROI Manager
    macro); the new model goes into your model folder, its name into OUT/model.txt."""
    from cellplug.io import atomic_path

    with _errors_to(out_dir):
        data, _ = convert.read_imagej_tiff(image)
        values = {"base": base, "name": name, "epochs": epochs, "cyto": channels[0],
                  "nucleus": channels[1]}
        new, result = commands.train_from_rois(
            data, convert.read_roiset(rois), stem or image.stem, values,
            current=(current[0] - 1, current[1] - 1), log=click.echo,  # stdout: exec() reads it
            source=str(rois))
        line = f"saved model {new!r} ({result.model_path})"
        with atomic_path(out_dir / "model.txt") as tmp:
            tmp.write_text(line + "\n", encoding="utf-8")
        click.echo(line)


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    register("fiji", fiji)
