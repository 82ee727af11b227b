"""The ``cellplug`` command line: parse options, call library functions, report.

User errors (:class:`~cellplug.errors.CellplugError`) are printed as one line on stderr with
exit code 1; anything else escaping a command is a bug, reported as one line too (the
traceback with ``cellplug --debug``). Outputs are written only when an image succeeded, all
of them or none, atomically; SIGTERM is handled like Ctrl-C (exit 143 and 130), so an
interrupted run leaves no partial output either.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import shlex
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import CellplugError
from .hookspecs import HOOK_KINDS

SAVE_CHOICES = ("flows", "overlay", "cellprob", "roi", "seg-npy")
# --save kinds written by an annotation source's writer: the way back to Fiji and Cellpose
SOURCE_WRITERS = {"roi": "imagej-roi", "seg-npy": "cellpose-seg-npy"}
SUFFIXES = {"masks": "_masks.tif", "flows": "_flows.tif", "cellprob": "_cellprob.tif",
            "overlay": "_overlay.png"}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _report(line: str, err: bool = True) -> None:
    """One line (on stderr by default), on a line of its own even while a progress bar runs."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        click.echo(line, err=err)


def _report_error(exc: BaseException, line: str) -> None:
    """An error that does not stop the run: one line, plus its traceback with --debug."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("debug"):
        import traceback

        traceback.print_exception(exc)  # to stderr
    _report(line)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, kill, batch schedulers), unwound exactly like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a GUI worker): leave it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["cellplug.argv"] = ["cellplug", *args]  # the command, for model lineage
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_plugin_commands()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or _plugin_commands().get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            with _sigterm_as_interrupt():
                return super().invoke(ctx)
        except CellplugError as exc:
            if debug:
                raise
            _report(f"error: {_one_line(exc)}")
            ctx.exit(1)
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, _Terminated)
            _report(f"error: {'terminated' if terminated else 'interrupted'}; outputs of the "
                    f"image in progress were not written")
            ctx.exit(143 if terminated else 130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            if debug:
                raise
            _report(f"error: internal error (a bug, please report it): {type(exc).__name__}: "
                    f"{_one_line(exc)} (rerun with --debug for the traceback)")
            ctx.exit(70)


def _plugin_commands() -> dict[str, click.Command]:
    """Commands registered by plugins (``register_commands``), minus clashes with built-ins."""
    from .plugins import get_registry

    out = {}
    for name, reg in get_registry().registrations("command").items():
        if name in main.commands:
            warnings.warn(f"plugin {reg.plugin!r}: command {name!r} is a built-in; ignored",
                          stacklevel=2)
        elif not isinstance(reg.obj, click.Command):
            warnings.warn(f"plugin {reg.plugin!r}: command {name!r} is not a click command; "
                          f"ignored", stacklevel=2)
        else:
            out[name] = reg.obj
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
    """Warnings (e.g. a plugin that failed to load) as one line on stderr, no source line."""
    click.echo(f"warning: {_one_line(message)}", err=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="cellplug")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Cell segmentation with flow fields, built from plugins."""
    # for this invocation only (CliRunner, notebooks): restored when the command ends
    ctx.with_resource(warnings.catch_warnings())
    warnings.showwarning = _show_warning


# -- plugins -----------------------------------------------------------------------------
@main.group()
def plugins() -> None:
    """Inspect installed plugins."""


@plugins.command("list")
@click.option("--kind", type=click.Choice(list(HOOK_KINDS)), help="Only this kind of plugin.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_list(kind: str | None, as_json: bool) -> None:
    """List what every installed plugin provides (and plugins that failed to load)."""
    from .plugins import get_registry

    registry = get_registry()
    rows = registry.rows([kind] if kind else None)
    if kind:  # failed plugins have no kind; show them in every listing
        rows += [r for r in registry.rows() if r["kind"] == "?" and r not in rows]
    runnable = _models_by_backbone(registry) if kind in (None, "backbone") else {}
    for r in rows:
        if r["kind"] == "backbone":
            r["models"] = runnable.get(r["name"], [])
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    headers = ("kind", "name", "plugin", "distribution", "status")
    table = [headers] + [
        (r["kind"], r["name"], r["plugin"],
         f"{r['distribution'] or '-'} {r['version'] or ''}".strip(), r["status"])
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers) - 1)]
    for row in table:
        cells = "  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True))
        click.echo(f"{cells}  {row[-1]}")
    backbones = [r for r in rows if r["kind"] == "backbone"]
    if backbones:
        click.echo("\nmodels each backbone runs:")
        width = max(len(r["name"]) for r in backbones)
        for r in backbones:
            click.echo(f"  {r['name']:<{width}}  {', '.join(r['models']) or '-'}")


def _models_by_backbone(registry: Any) -> dict[str, list[str]]:
    """Backbone name -> the installed models it can run: those of its own layout, and for
    a runtime backbone (``runs``) those of every backbone it runs."""
    from .models import available_models, runs_backbone

    with warnings.catch_warnings():  # a broken user model is reported by `models list`
        warnings.simplefilter("ignore")
        models = available_models(registry)
    out: dict[str, list[str]] = {}
    for name, reg in registry.registrations("backbone").items():
        out[name] = sorted(m.name for m in models.values() if m.backbone == name
                           or runs_backbone(reg.obj, m.backbone, registry))
    return out


# -- models ------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """List, inspect, add, remove and export models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_list(as_json: bool) -> None:
    """List models provided by plugins and found in the user's model directory."""
    from .models import DEFAULT_MODEL, available_models, user_model_dir

    found = available_models()
    rows = [
        {
            "name": m.name,
            "origin": m.origin,
            "default": m.name == DEFAULT_MODEL,
            "diam_mean": m.metadata.get("diam_mean"),
            "size_model": bool(m.metadata.get("size_model")),
            "weights": str(m.weights),
        }
        for m in found.values()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no models installed (user model directory: {user_model_dir()})")
    for r in rows:
        star = "*" if r["default"] else " "
        click.echo(
            f"{star} {r['name']:<24} {r['origin']:<24} diam_mean={r['diam_mean']}  {r['weights']}"
        )


@models.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_info(name: str, as_json: bool) -> None:
    """Show a model's metadata: architecture, diameters, channels, data, lineage, metrics."""
    from .zoo import describe

    doc = describe(name)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    for key, value in doc.items():
        if isinstance(value, dict | list):
            value = json.dumps(value, default=str)
            value = value if len(value) <= 200 else value[:197] + "..."
        click.echo(f"{key:<15} {value}")


@models.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Name in your model folder (default: the file's).")
def models_add(path: Path, name: str | None) -> None:
    """Check a model file (ours, or a Cellpose 2/3 .pth with its _size.npy) and copy it into
    your model folder; nothing is copied if any check fails."""
    from .zoo import add_model

    info = add_model(path, name)
    click.echo(f"added {info.name!r} -> {info.weights} (sha256 "
               f"{info.metadata['added_from']['sha256'][:12]})")


@models.command("remove")
@click.argument("name")
def models_remove(name: str) -> None:
    """Delete a model from your model folder (plugin models cannot be removed)."""
    from .zoo import remove_model

    click.echo(f"removed {remove_model(name)}")


@models.command("export")
@click.argument("name")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
def models_export(name: str, folder: Path) -> None:
    """Copy a model (weights + metadata) into FOLDER, to share it."""
    from .zoo import export_model

    for p in export_model(name, folder):
        click.echo(f"wrote {p}")


# -- plugin choices (segment, eval, train) ---------------------------------------------------
def _key_values(items: tuple[str, ...], hint: str) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict; a value that reads as JSON (3, 0.5, true, [32, 64])
    is that, anything else stays a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=hint)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _backbone_choice(func: Any) -> Any:
    """--backbone / --backbone-option / --reconstructor, shared by segment and eval."""
    func = click.option(
        "--reconstructor", default=None,
        help="Mask reconstructor plugin (default: the model's, cellpose-dynamics).")(func)
    func = click.option(
        "--backbone-option", "backbone_options", multiple=True, metavar="KEY=VALUE",
        help="Option of the backbone, e.g. precision=f32 or cache_dir=DIR for openvino. "
             "Repeatable.")(func)
    return click.option(
        "--backbone", default=None,
        help="Run the model with this backbone plugin (e.g. openvino, which runs any torch "
             "backbone's weights); refused when it cannot load the model's weights.")(func)


def _scale_options(func: Any) -> Any:
    """Batches, large images and dask (issue 23; cellplug.batch, cellplug.blockwise)."""
    options = [
        click.option("--resume", is_flag=True,
                     help="Skip images whose outputs all exist (outputs are written all or "
                          "none, so existing ones are complete)."),
        click.option("--measure", type=click.Choice(["csv", "parquet"]), default=None,
                     help="Per-object measurements (area, centroid, bbox, eccentricity, "
                          "solidity, mean intensity) in <stem>_objects.csv|parquet."),
        click.option("--summary-csv", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="Write one row per image to this CSV file."),
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Images segmented at once (dask threads; torch threads are shared "
                          "out unless --threads is given)."),
        click.option("--dask-scheduler", default=None, metavar="ADDRESS",
                     help="Run on this dask.distributed scheduler (tcp://host:8786); each "
                          "worker loads the model once. Paths must be visible to workers."),
        click.option("--block-size", type=click.IntRange(min=0), default=0,
                     help="Segment block-wise in blocks of this many pixels (0: only "
                          "OME-Zarr inputs and tiled TIFFs above 4096 x 4096 pixels, in "
                          "blocks of 2048)."),
        click.option("--stack", is_flag=True,
                     help="Segment z-stacks and time series plane by plane (axes from the "
                          "file or --axes; labels saved with the same T/Z axes)."),
        click.option("--stitch-threshold", type=click.FloatRange(0, 1), default=0.0,
                     show_default=True,
                     help="With --stack: link objects of consecutive z planes whose IoU is "
                          "at least this (3-D objects, as Cellpose's stitch_threshold)."),
        click.option("--halo", type=click.IntRange(min=0), default=None,
                     help="Pixels of context around each block (default: 4 diameters)."),
        click.option("--labels-format", type=click.Choice(["tiff", "ome-zarr"]),
                     default=None,
                     help="Block-wise labels as a tiled <stem>_masks.tif (default for TIFF "
                          "inputs) or in OME-Zarr labels/masks (default for OME-Zarr inputs: "
                          "beside the image; with --out, a new <stem>.ome.zarr)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _plugin_record(segmenter: Any) -> dict[str, Any]:
    """Backbone (and options), decoder and reconstructor used, for summary.json."""
    names = dict(getattr(segmenter, "plugin_names", None) or {})
    options = names.get("backbone_options") or {}
    names["backbone_options"] = {k: v if isinstance(v, int | float | str | bool | None | list)
                                 else str(v) for k, v in options.items()}
    return names


# -- segment -----------------------------------------------------------------------------
def _channels(value: tuple[int, int] | None) -> tuple[int, int]:
    from .transforms import parse_channels

    return parse_channels(value)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: beside each input).")
@click.option("--model", "model_ref", default=None,
              help="Model name or path (default: generalist); 'auto': the zoo model each "
                   "image's style selects.")
@click.option("--selector", default=None,
              help="Style selector plugin for --model auto (default: nearest-centroid).")
@click.option("--diameter", type=float, default=0.0, show_default=True,
              help="Object diameter in pixels; 0 estimates it with the model's size model.")
@click.option("--channels", nargs=2, type=int, default=(0, 0), show_default=True,
              help="Cyto and nucleus channel (0 = grayscale / none, 1 = first).")
@click.option("--invert", is_flag=True, help="Invert intensities (dark objects on bright).")
@click.option("--flow-threshold", type=float, default=0.4, show_default=True)
@click.option("--cellprob-threshold", type=float, default=0.0, show_default=True)
@click.option("--min-size", type=int, default=15, show_default=True)
@click.option("--niter", type=int, default=None,
              help="Dynamics steps (default: 200 x diameter / diam_mean).")
@click.option("--tile", "tile", type=click.Choice(["on", "off", "auto", "grid"]), default="on",
              show_default=True,
              help="on: Cellpose's 224 px tiles; off: one whole-image pass (faster, masks can "
                   "differ); auto: whole image when it fits in memory; grid: tiles fixed to the "
                   "image's origin, what --block-size computes (results independent of the crop).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True,
              help="auto: bfloat16 where the CPU has it natively, else float32. "
                   "--tile on --precision fp32 reproduces Cellpose exactly.")
@click.option("--augment", is_flag=True, help="Flip test-time augmentation.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--save", "save", multiple=True, type=click.Choice(SAVE_CHOICES),
              help="Extra outputs: flows (TIFF), overlay (PNG), cellprob (TIFF), roi (ImageJ "
                   "ROI set, <stem>_RoiSet.zip), seg-npy (Cellpose GUI file, <stem>_seg.npy). "
                   "Repeatable.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary and write summary.json.")
@click.option("--threads", type=int, default=None, help="Torch threads (default: torch's choice).")
@click.option("--axes", default=None, metavar="AXES",
              help="Dimension order of the stored images (e.g. YX, CYX, YXC, ZYX), for files "
                   "without axis metadata; default: from the file, else guessed (with a "
                   "warning).")
@click.option("--on-error", type=click.Choice(["skip", "stop"]), default="skip",
              show_default=True,
              help="skip: report a bad image and go on with the others; stop: stop at the first.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_backbone_choice
@_scale_options
def segment(inputs: tuple[Path, ...], out_dir: Path | None, model_ref: str | None,
            selector: str | None, diameter: float, channels: tuple[int, int], invert: bool,
            flow_threshold: float,
            cellprob_threshold: float, min_size: int, niter: int | None, tile: str,
            precision: str, augment: bool, batch_size: int, save: tuple[str, ...], as_json: bool,
            threads: int | None, axes: str | None, on_error: str, quiet: bool,
            backbone: str | None = None, backbone_options: tuple[str, ...] = (),
            reconstructor: str | None = None, **scale: Any) -> None:
    """Segment images (files or folders) and write <stem>_masks.tif for each.

    A bad input is reported on one line and the other images are still segmented (exit
    code 1 at the end). Outputs go beside each input, or into --out; two inputs that would
    write the same output file (a/img.tif and b/img.tif with one --out, or img.png beside
    img.tif) are refused before anything runs.
    """
    from tqdm import tqdm

    from . import io
    from .segmenter import SegmentOptions

    if not diameter >= 0 or diameter == float("inf"):
        raise click.BadParameter("must be a number >= 0", param_hint="--diameter")
    from . import batch

    large_inputs = [p for p in inputs if batch.is_large_input(p, scale["block_size"])]
    files, problems = io.collect_images([p for p in inputs if p not in large_inputs])
    writers = _source_writers(save)
    plans = {path: _output_targets(path, out_dir, save, writers, scale["measure"])
             for path in files}
    _check_unique_outputs(plans)
    opts = SegmentOptions(
        diameter=diameter, channels=_channels(channels), invert=invert,
        tile={"on": True, "off": False}.get(tile, tile), precision=precision, augment=augment,
        batch_size=batch_size, niter=niter, cellprob_threshold=cellprob_threshold,
        flow_threshold=flow_threshold, min_size=min_size,
    )
    summary: list[dict[str, Any]] = []
    for problem in problems:  # missing files, empty folders: the rest still runs
        _report(f"error: {_one_line(problem)}")
        summary.append({"image": str(problem.path), "error": _one_line(problem)})
        if on_error == "stop":
            raise SystemExit(1)
    failed = len(problems)
    choice_opts = _key_values(backbone_options, "--backbone-option")
    plugin_args = {"backbone": backbone, "backbone_options": choice_opts,
                   "reconstructor": reconstructor}
    workers, address = scale["workers"], scale["dask_scheduler"]
    if threads is None and (workers > 1 or large_inputs):
        threads = batch.default_threads(workers)
    todo = []
    for path in files:
        if scale["resume"] and batch.outputs_complete(plans[path]):
            summary.append({"image": str(path), "status": "skipped",
                            "masks": str(plans[path][0][1])})
        else:
            todo.append(path)
    segmenter = (_segmenter(model_ref, selector, threads, backbone, choice_opts, reconstructor)
                 if todo or large_inputs else None)
    job = batch.FileJob(model_ref, selector, threads, opts, axes, save, scale["measure"],
                        plugin_args, scale["stack"], scale["stitch_threshold"])
    skipped = len(files) - len(todo)
    if skipped and not quiet:
        _report(f"--resume: {skipped} image(s) already done, skipped")
    bar = tqdm(total=len(todo) + len(large_inputs), desc="segmenting", unit="image",
               disable=quiet or len(todo) + len(large_inputs) < 2)
    rows = batch.run_files(job, [(p, plans[p]) for p in todo], segmenter, address, workers)
    rows = itertools.chain(rows, batch.run_large(job, large_inputs, out_dir, segmenter, scale))
    for row in rows:
        bar.update()
        trace = row.pop("traceback", None)
        summary.append(row)
        if "error" in row:
            if trace and click.get_current_context().find_root().params.get("debug"):
                click.echo(trace, err=True, nl=False)
            _report(f"error: {row['error']}")
            failed += 1
            if on_error == "stop":
                break
        elif not quiet and not as_json and row.get("status") != "skipped":
            choice = row.get("choice")
            chosen = f"; model {choice['model']}: {choice['reason']}" if choice else ""
            _report(f"{row['image']}: {row['objects']} objects "
                    f"(diameter {row['diameter']:.1f} px{chosen}) -> {row['masks']}",
                    err=False)
    bar.close()
    if scale["summary_csv"]:
        batch.write_summary_csv(scale["summary_csv"], summary)
    if as_json:
        doc = {"model": _model_label(segmenter, model_ref),
               **(_plugin_record(segmenter) if segmenter is not None else {}),
               "images": summary, "failed": failed}
        click.echo(json.dumps(doc, indent=2))
        done = [Path(e["masks"]) for e in summary if "masks" in e and "status" not in e]
        if done:
            target = (out_dir or done[0].parent) / "summary.json"
            try:
                io.write_json(target, doc)
            except OSError as exc:
                raise CellplugError(f"cannot write {target} ({exc.strerror or exc}); the "
                                    f"images' outputs were written") from None
    if failed:
        raise SystemExit(1)


def _segmenter(model_ref: str | None, selector: str | None, threads: int | None,
               backbone: str | None = None, backbone_options: dict[str, Any] | None = None,
               reconstructor: str | None = None) -> Any:
    """A :class:`~cellplug.segmenter.Segmenter`, or for ``auto`` an
    :class:`~cellplug.selection.AutoSegmenter` over the default model's zoo."""
    from .segmenter import Segmenter
    from .selection import AUTO, AutoSegmenter

    if model_ref == AUTO:
        if backbone or backbone_options or reconstructor:
            raise click.UsageError("--backbone, --backbone-option and --reconstructor apply to "
                                   "one model, not to --model auto")
        return AutoSegmenter.from_zoo(selector=selector, threads=threads)
    if selector is not None:
        raise click.UsageError("--selector chooses among zoo models: use it with --model auto")
    return Segmenter.from_model(model_ref, threads=threads, reconstructor=reconstructor,
                                backbone=backbone, backbone_options=backbone_options or None)


def _segment_one(segmenter: Any, image: Any, opts: Any, **overrides: Any) -> tuple[Any, Any]:
    """(segmentation, choice): the choice of ``--model auto`` (None for one model)."""
    from .selection import AutoSegmenter

    if isinstance(segmenter, AutoSegmenter):
        return segmenter.segment(image, opts, **overrides)
    return segmenter.segment(image, opts, **overrides), None


def _model_label(segmenter: Any, model_ref: str | None) -> str | None:
    from .selection import AUTO

    if segmenter is None:
        return None
    return f"auto (zoo of {segmenter.model.name})" if model_ref == AUTO else segmenter.model.name


def _output_targets(path: Path, out_dir: Path | None, save: tuple[str, ...],
                    writers: dict[str, Any], measure: str | None = None
                    ) -> list[tuple[str, Path]]:
    """(kind, path) of each output of ``path``: the masks first, then each --save kind
    (``writers``: from :func:`_source_writers`, for the kinds a source writes), then the
    per-object table of --measure (``<stem>_objects.csv|parquet``)."""
    folder = out_dir or path.parent
    out = [("masks", folder / f"{path.stem}{SUFFIXES['masks']}")]
    for kind in SAVE_CHOICES:
        if kind in save:
            suffix = SUFFIXES.get(kind) or writers[kind].output_suffix
            out.append((kind, folder / f"{path.stem}{suffix}"))
    if measure:
        out.append(("measure", folder / f"{path.stem}_objects.{measure}"))
    return out


def _source_writers(save: tuple[str, ...]) -> dict[str, Any]:
    """The annotation sources that write the --save kinds of :data:`SOURCE_WRITERS`."""
    from .plugins import get_registry

    registry = get_registry()
    return {kind: registry.get("source", name) for kind, name in SOURCE_WRITERS.items()
            if kind in save}


def _check_unique_outputs(plans: dict[Path, list[Path]]) -> None:
    """Refuse, before any work, two inputs that would write the same output file."""
    owner: dict[Path, Path] = {}
    for path, targets in plans.items():
        masks = targets[0][1]
        key = masks.resolve()
        if key in owner:
            raise CellplugError(
                f"{owner[key]} and {path} would both write {masks}; give them different "
                f"--out folders or rename one (nothing was written)"
            )
        owner[key] = path


def _write_outputs(targets: list[tuple[str, Path]], image, result, writers: dict[str, Any],
                   path: Path, opts: Any, extra: dict[str, Any] | None = None) -> list[Path]:
    """Write an image's outputs to ``targets`` (from :func:`_output_targets`): all or none.

    An output that existed before is replaced only when every new one is ready, and kept
    as it was when anything fails.
    """
    from . import io, render

    paths = [p for _, p in targets]
    for target in paths:
        if target.exists() and not target.is_file():
            raise CellplugError(f"cannot write {target}: it exists and is not a file")
    write = {
        "masks": lambda p: io.write_labels(p, result.labels, atomic=False),
        "flows": lambda p: io.write_tiff(p, result.flows, "CYX", atomic=False),
        "cellprob": lambda p: io.write_tiff(p, result.cellprob, "YX", atomic=False),
        "overlay": lambda p: io.write_png(
            p, render.outline_overlay(image, result.labels), atomic=False),
        "roi": lambda p: writers["roi"].write(p, image, result.labels),
        "seg-npy": lambda p: writers["seg-npy"].write(
            p, image, result.labels, flows=result.flows, cellprob=result.cellprob,
            diameter=result.diameter, channels=tuple(opts.channels), filename=str(path)),
        **(extra or {}),  # e.g. "measure" (cellplug.batch)
    }
    try:
        with io.atomic_paths(paths) as temps:
            for (kind, target), tmp in zip(targets, temps, strict=True):
                try:
                    write[kind](tmp)
                except OSError as exc:  # disk full...
                    raise CellplugError(f"cannot write {target} ({exc.strerror or exc})") from None
    except OSError as exc:  # read-only folder (no temporary file), a failed rename...
        where = exc.filename2 or exc.filename or paths[0].parent
        raise CellplugError(f"cannot write {where} ({exc.strerror or exc})") from None
    return paths


# -- train -------------------------------------------------------------------------------
def _sampling_groups(src: Path, column: str | None) -> dict[str, str]:
    """stem -> "<source>/<value of column>" from the source's metadata.csv ({} if none)."""
    if column is None:
        return {}
    meta = src / "metadata.csv"
    if not meta.is_file():
        raise CellplugError(f"{src}: --group-by needs a metadata.csv in the source folder")
    import csv

    with open(meta, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and ("stem" not in rows[0] or column not in rows[0]):
        raise CellplugError(f"{meta}: needs columns 'stem' and {column!r}")
    return {r["stem"]: f"{src.name}/{r[column]}" for r in rows}


def _train_backbone(name: str | None, options: dict[str, Any],
                    registry: Any) -> tuple[str | None, dict[str, Any]]:
    """The backbone ``train`` builds for ``--backbone NAME``: NAME itself, or for an
    inference-only backbone the torch backbone it runs (its ``base`` option), with a note.
    The saved model names the torch backbone; ``segment --backbone NAME`` runs it."""
    from .models import _default_option, is_inference_only

    if name is None:
        return None, options
    factory = registry.get("backbone", name)
    if not is_inference_only(factory):
        return name, options
    base = options.pop("base", None) or _default_option(factory, "base")
    if not base:
        raise CellplugError(f"backbone {name!r} is inference-only and names no torch backbone "
                            f"to train; train another backbone and run it with segment "
                            f"--backbone {name}")
    runtime = sorted(k for k in options if k in _factory_params(factory))
    if runtime:
        raise click.BadParameter(f"{', '.join(runtime)}: options of {name!r} at run time, not "
                                 f"of the torch backbone trained", param_hint="--backbone-option")
    click.echo(f"backbone {name!r} is inference-only: training its torch backbone {base!r} "
               f"(run the model with segment --backbone {name})", err=True)
    return str(base), options


def _factory_params(factory: Any) -> set[str]:
    import inspect

    try:
        return {p.name for p in inspect.signature(factory).parameters.values()
                if p.kind is p.KEYWORD_ONLY}
    except (TypeError, ValueError):
        return set()


def _is_val(stem: str, fraction: float, seed: int) -> bool:
    h = int(hashlib.sha1(f"{seed}:{stem}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path),
              help="Model path (.pth; metadata goes to .json beside it).")
@click.option("--name", "model_name", default=None,
              help="Save into your model folder under this new name instead of --out (never "
                   "overwrites: name each round, e.g. mylab-r1, mylab-r2).")
@click.option("--base", "base_ref", default=None,
              help="Start from this model (name or path): fine-tuning.")
@click.option("--recipe", type=click.Choice(["hitl", "hitl-replay", "scratch"]), default=None,
              help="Defaults for the options below: hitl (Cellpose 2.0's recipe for 1-10 "
                   "corrected images: SGD lr 0.1, weight decay 1e-4, 100 epochs, no warm-up; "
                   "the default with --base), hitl-replay (the same with 150 epochs; the "
                   "default with --base and --replay) or scratch (AdamW lr 0.005, weight "
                   "decay 1e-5, 10 warm-up epochs; the default without).")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=None)
@click.option("--source", "source_name", default=None,
              help="Annotation source (default: auto-detect).")
@click.option("--source-option", "source_options", multiple=True, metavar="KEY=VALUE",
              help="Option of --source, e.g. mask_suffix=_Nuclei for CellProfiler label "
                   "images. Repeatable.")
@click.option("--replay", "replay_sources", multiple=True,
              type=click.Path(exists=True, path_type=Path),
              help="Annotated images of what the base model already segments (a few of its "
                   "training images, earlier rounds' corrections), rehearsed in every batch "
                   "so that the fine-tune does not forget them. Repeatable.")
@click.option("--replay-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Share of each batch drawn from --replay (default 0.5).")
@click.option("--val-list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File listing validation stems (one per line), kept out of training.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True,
              help="Hold out this fraction (by stem hash) when no --val-list is given.")
@click.option("--epochs", type=click.IntRange(min=0), default=None,
              help="Training epochs (recipe: 100); 0 (with --base only) keeps the base's "
                   "weights and refits its size model.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="(recipe: 8)")
@click.option("--patch", type=click.IntRange(min=32), default=224, show_default=True,
              help="Square patch size (pixels, a multiple of 16).")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="(recipe: 0.1 hitl, 0.005 scratch)")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help="(recipe: 1e-4 hitl, 1e-5 scratch)")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=None,
              help="(recipe: 0 hitl, 10 scratch)")
@click.option("--diam-mean", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True,
              help="Object diameter patches are rescaled to (new models only).")
@click.option("--images-per-epoch", type=click.IntRange(min=1), default=None)
@click.option("--sampling", type=click.Choice(["uniform", "sqrt"]), default="uniform",
              show_default=True,
              help="sqrt: each group drawn in proportion to the square root of its size.")
@click.option("--group-by", "group_column", default=None, metavar="COLUMN",
              help="Sampling groups from COLUMN of each source's metadata.csv (default: one "
                   "group per source).")
@click.option("--eval-every", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--eval-images", type=click.IntRange(min=1), default=None,
              help="Validation images scored per evaluation.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="fp32",
              show_default=True,
              help="bf16: bfloat16 autocast, ~2x faster where the CPU has native bfloat16 "
                   "(AVX512-BF16, AMX) and many times slower where it does not; auto: bf16 "
                   "only where it is native.")
@click.option("--bf16", is_flag=True, help="Same as --precision bf16.")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--channels", nargs=2, type=int, default=(0, 0), show_default=True)
@click.option("--size-epochs", type=click.IntRange(min=1), default=4, show_default=True,
              help="Passes over the training images to fit the size model.")
@click.option("--size-model", type=click.Choice(["auto", "fit", "keep"]), default="auto",
              show_default=True,
              help="fit: fit the size model on the training images; keep: keep the base "
                   "model's; auto: keep it when fine-tuning on fewer than 10 images.")
@click.option("--on-error", type=click.Choice(["stop", "skip"]), default="stop",
              show_default=True,
              help="stop: a bad image/label pair stops the run before training; skip: report "
                   "it, leave it out, and train on the rest.")
@click.option("-q", "--quiet", is_flag=True)
@click.option("--decoder", "decoder_name", default=None,
              help="Flow decoder plugin of a new model (default: cellpose-flows).")
@click.option("--backbone-option", "backbone_options", multiple=True, metavar="KEY=VALUE",
              help="Factory option of a new model's backbone, e.g. nbase=[32,64,128,256]. "
                   "Repeatable.")
@click.option("--backbone", default=None,
              help="Backbone plugin of a new model (default: cellpose-unet). An inference-only "
                   "backbone (openvino) trains its torch base backbone instead.")
def train(sources: tuple[Path, ...], out_path: Path | None, model_name: str | None,
          base_ref: str | None, recipe: str | None, optimizer: str | None,
          source_name: str | None, source_options: tuple[str, ...],
          replay_sources: tuple[Path, ...], replay_fraction: float | None,
          val_list: Path | None, val_fraction: float,
          epochs: int | None, batch_size: int | None, patch: int,
          learning_rate: float | None, weight_decay: float | None, warmup_epochs: int | None,
          diam_mean: float,
          images_per_epoch: int | None, sampling: str, group_column: str | None,
          eval_every: int, eval_images: int | None,
          checkpoint_dir: Path | None, checkpoint_every: int, resume: bool, precision: str,
          bf16: bool, threads: int | None, seed: int, channels: tuple[int, int], size_epochs: int,
          size_model: str, on_error: str, quiet: bool, backbone: str | None = None,
          backbone_options: tuple[str, ...] = (), decoder_name: str | None = None) -> None:
    """Train (or fine-tune with --base) a model on annotated images.

    SOURCES are folders an annotation source reads: images with <stem>_masks.tif (Cellpose's
    training folders), Cellpose GUI <stem>_seg.npy files, or ImageJ ROI sets
    (<stem>_RoiSet.zip, <stem>.zip, <stem>.roi); --source picks one when several could.
    """
    from .annotations import read_annotations
    from .annotations import source_name as detect_source
    from .hitl import REPLAY_FRACTION, lineage, recipe_config, replay_description
    from .inference import resolve_precision
    from .models import build_network, resolve_model
    from .plugins import get_registry
    from .train import prepare_samples
    from .train import train as run_training

    if bf16:
        precision = "bf16"
    if patch % 16:
        raise click.BadParameter(f"{patch} is not a multiple of 16", param_hint="--patch")
    if epochs == 0 and base_ref is None:
        raise click.BadParameter("0 trains nothing; without --base that would save an untrained "
                                 "network", param_hint="--epochs")
    if (out_path is None) == (model_name is None):
        raise click.UsageError("give --out PATH or --name NAME (one of them)")
    if replay_fraction is not None and not replay_sources:
        raise click.UsageError("--replay-fraction needs --replay")
    if model_name is not None:
        from .zoo import new_model_path

        out_path = new_model_path(model_name)
    assert out_path is not None
    registry = get_registry()
    backbone, backbone_opts = _train_backbone(backbone, _key_values(
        backbone_options, "--backbone-option"), registry)
    config = recipe_config(
        recipe or ("scratch" if not base_ref else "hitl-replay" if replay_sources else "hitl"),
        backbone=backbone, backbone_options=backbone_opts or None, decoder=decoder_name,
        epochs=epochs, batch_size=batch_size, patch=patch, learning_rate=learning_rate,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, optimizer=optimizer,
        diam_mean=diam_mean,
        images_per_epoch=images_per_epoch, sampling=sampling, seed=seed, eval_every=eval_every,
        eval_images=eval_images, checkpoint_every=checkpoint_every,
        bf16=resolve_precision(precision) == "bf16", threads=threads,
        channels=_channels(channels), size_epochs=size_epochs, size_model=size_model,
        replay_fraction=(REPLAY_FRACTION if replay_fraction is None else replay_fraction)
        if replay_sources else None,
    )
    base = resolve_model(base_ref, registry) if base_ref else None
    if base is not None:  # a bad base model fails now, not after the data is prepared
        build_network(base, registry)
        for flag, given, has in (("--backbone", backbone, base.backbone),
                                 ("--decoder", decoder_name, base.decoder)):
            if given is not None and given != has:
                raise click.UsageError(
                    f"{flag} {given}: fine-tuning keeps the base model's architecture, and "
                    f"{base.name!r} has {flag[2:]} {has!r}")
        if backbone_opts:
            raise click.UsageError("--backbone-option applies to a new model, not with --base")
    else:  # unknown plugin names fail now too
        registry.get("backbone", config.backbone)
        registry.get("decoder", config.decoder)
    decoder = registry.get("decoder", base.decoder if base else config.decoder)
    val_stems = set(val_list.read_text().split()) if val_list else None
    train_s, val_s, described, used = [], [], [], []
    formats: list[str] = []
    skipped: list[str] = []

    def skip(exc: CellplugError) -> None:
        _report_error(exc, f"error: {_one_line(exc)} (skipped)")
        skipped.append(_one_line(exc))

    options = {}
    for item in source_options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--source-option")
        options[key] = value
    for src in sources:
        formats.append(detect_source(src, source_name, registry) if not options else
                       str(source_name))
        anns = list(read_annotations(src, formats[-1], registry,
                                     on_error=skip if on_error == "skip" else None,
                                     options=options or None))
        if val_stems is not None:
            is_val = [a.stem in val_stems for a in anns]
        else:
            is_val = [_is_val(a.stem, val_fraction, seed) for a in anns]
        tr = [a for a, v in zip(anns, is_val, strict=True) if not v]
        va = [a for a, v in zip(anns, is_val, strict=True) if v]
        used += tr
        groups = _sampling_groups(src, group_column)
        for group in sorted({groups.get(a.stem, src.name) for a in anns}):
            tr_g = [a for a in tr if groups.get(a.stem, src.name) == group]
            va_g = [a for a in va if groups.get(a.stem, src.name) == group]
            train_s += prepare_samples(tr_g, decoder, config.channels, 2, group,
                                       config.min_train_masks, not quiet)
            val_s += prepare_samples(va_g, decoder, config.channels, 2, group, 1, not quiet)
        described.append({"source": src.resolve().name, "n_train": len(tr), "n_val": len(va)})
        click.echo(f"{src}: {len(tr)} training, {len(va)} validation images", err=True)
    replayed = []
    for src in replay_sources:  # all of it trains: rehearsal, never validation
        anns = list(read_annotations(src, None, registry,  # the source auto-detected
                                     on_error=skip if on_error == "skip" else None))
        replayed += anns
        train_s += prepare_samples(anns, decoder, config.channels, 2, "replay",
                                   config.min_train_masks, not quiet, replay=True)
        click.echo(f"{src}: {len(anns)} images to rehearse", err=True)
    result = run_training(
        train_s, val_s, out_path, config, base_model=base, registry=registry,
        checkpoint_dir=checkpoint_dir, resume=resume, progress=not quiet,
        data_description={"sources": described, "val_list": val_list.name if val_list else None,
                          "groups": sorted({t.group for t in train_s}), "skipped": skipped,
                          **({"replay": replay_description(replayed)} if replayed else {}),
                          **lineage(used, ", ".join(sorted(set(formats))),
                                    shlex.join(click.get_current_context().meta.get(
                                        "cellplug.argv", sys.argv)))},
        log_fn=lambda m: click.echo(m, err=True),
    )
    name = f" as model {model_name!r}" if model_name else ""
    if config.epochs == 0:
        click.echo(f"saved {result.model_path}{name} (not trained: --epochs 0 kept the weights "
                   f"of {base_ref} and refitted its size model)")
    else:
        click.echo(f"saved {result.model_path}{name} (trained {config.epochs} epochs"
                   f"{f'; {len(skipped)} bad pair(s) skipped' if skipped else ''})")


# -- zoo ---------------------------------------------------------------------------------
@main.group()
def zoo() -> None:
    """Build a zoo of style models for --model auto."""


@zoo.command("build")
@click.argument("sources", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the models, styles, clusters and report (resumes what is there).")
@click.option("--reference", default=None,
              help="Model whose styles are clustered and that each style model is fine-tuned "
                   "from (default: generalist).")
@click.option("--val-list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Stems to leave out (your validation images), one per line.")
@click.option("--k", "k", type=int, default=None,
              help="Number of clusters (default: by mean silhouette from 2 to --k-max).")
@click.option("--k-max", type=int, default=6, show_default=True)
@click.option("--min-cluster", type=int, default=10, show_default=True,
              help="Smallest cluster (images) a K may give to be chosen.")
@click.option("--prefix", default="style", show_default=True,
              help="Model names: PREFIX-1 ... PREFIX-K, largest cluster first.")
@click.option("--group-by", "group_column", default=None, metavar="COLUMN",
              help="Describe the clusters by this column of each source's metadata.csv "
                   "(e.g. modality); it does not change the clustering.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--images-per-epoch", type=int, default=200, show_default=True)
@click.option("--learning-rate", type=float, default=0.001, show_default=True)
@click.option("--decay-fraction", type=float, default=0.2, show_default=True,
              help="Last fraction of the epochs over which the learning rate is halved ten "
                   "times (only when that is 10 epochs or more; 1.0 with 10 epochs: halved "
                   "every epoch, an annealed short fine-tune).")
@click.option("--weight-decay", type=float, default=1e-5, show_default=True)
@click.option("--patch", type=int, default=128, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True, help="Training arithmetic (auto: bf16 where native).")
@click.option("--threads", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mix", type=float, multiple=True,
              help="Ship MIX x each fine-tune + (1 - MIX) x the reference's weights "
                   "(weight-space interpolation; default 1: the fine-tunes as they are). "
                   "Repeat with --holdout: the gate picks one per cluster.")
@click.option("--holdout", type=float, default=0.0, show_default=True,
              help="Share of each cluster's images kept out of its fine-tune to gate it: the "
                   "best mix ships only if it beats the reference on them, else the "
                   "cluster's images go to the reference (0: no gate).")
@click.option("--holdout-max", type=int, default=16, show_default=True,
              help="At most this many held-out images per cluster.")
@click.option("--gate-margin", type=float, default=0.0, show_default=True,
              help="AP@0.5 by which a cluster's model must beat the reference on its "
                   "held-out images.")
@click.option("--add", "add_to_zoo", is_flag=True,
              help="Also add the models to your model folder, so --model auto uses them.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def zoo_build(sources: tuple[Path, ...], out_dir: Path, reference: str | None,
              val_list: Path | None, k: int | None, k_max: int, min_cluster: int, prefix: str,
              group_column: str | None, epochs: int, images_per_epoch: int,
              learning_rate: float, decay_fraction: float, weight_decay: float, patch: int,
              batch_size: int,
              precision: str, threads: int | None, seed: int, mix: tuple[float, ...],
              holdout: float, holdout_max: int, gate_margin: float, add_to_zoo: bool,
              quiet: bool) -> None:
    """Cluster the training images of SOURCES by the reference model's style and fine-tune
    one model per cluster from it (see cellplug.zoo_build)."""
    from .annotations import read_annotations
    from .hitl import recipe_config
    from .inference import resolve_precision
    from .models import resolve_model
    from .plugins import get_registry
    from .zoo import add_model
    from .zoo_build import build_zoo

    if k is not None and k < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--k")
    registry = get_registry()
    ref = resolve_model(reference, registry)
    held_out = set(val_list.read_text().split()) if val_list else set()
    anns, groups = [], {}
    for src in sources:
        found = [a for a in read_annotations(src, None, registry) if a.stem not in held_out]
        click.echo(f"{src}: {len(found)} images", err=True)
        anns += found
        groups.update(_sampling_groups(src, group_column) if group_column else {})
    config = recipe_config(
        "scratch", epochs=epochs, images_per_epoch=images_per_epoch,
        learning_rate=learning_rate, weight_decay=weight_decay, warmup_epochs=min(2, epochs),
        decay_fraction=decay_fraction,
        patch=patch, batch_size=batch_size, seed=seed, threads=threads,
        bf16=resolve_precision(precision) == "bf16", size_model="keep",
    )
    result = build_zoo(
        anns, out_dir, ref, config, prefix=prefix, k=k, k_range=range(2, k_max + 1),
        min_cluster=min_cluster, groups=groups or None, registry=registry,
        progress=not quiet, log_fn=lambda m: click.echo(m, err=True),
        command=shlex.join(click.get_current_context().meta.get("cellplug.argv", sys.argv)),
        mix=mix or (1.0,), holdout=holdout, holdout_max=holdout_max, gate_margin=gate_margin,
    )
    for path in result.models:
        if add_to_zoo:
            info = add_model(path, path.stem, registry)
            click.echo(f"{path} -> your model folder as {info.name!r}")
        else:
            click.echo(str(path))
    click.echo(f"report: {result.report}", err=True)


# -- eval --------------------------------------------------------------------------------
def _eval_inputs(inputs: tuple[Path, ...], suffix: str) -> list[tuple[str, Path, bool]]:
    """(stem, path, is_prediction) for every input; a folder holding only ``*<suffix>``
    label files is a folder of predictions, otherwise its images are segmented."""
    from . import io
    from .errors import InputError

    out = []
    for item in inputs:
        if item.is_dir():
            files = sorted(f for f in item.iterdir() if f.is_file() and io.is_image_path(f)
                           and not f.name.startswith("."))
            files = [f for f in files if not f.stem.endswith(io.EXTRA_OUTPUT_SUFFIXES)]
            images = [f for f in files if not f.stem.endswith(suffix)]
            if images:
                out += [(f.stem, f, False) for f in io.list_images([item])]
            else:
                preds = [f for f in files if f.stem.endswith(suffix)]
                if not preds:
                    raise InputError(item, "no images or label files")
                out += [(f.stem[: -len(suffix)], f, True) for f in preds]
        elif not item.exists():
            raise InputError(item, "no such file")
        elif item.stem.endswith(suffix):
            out.append((item.stem[: -len(suffix)], item, True))
        else:
            out.append((item.stem, item, False))
    return out


def _find_truth(gt_dir: Path, stem: str, suffix: str) -> Path | None:
    from .io import IMAGE_SUFFIXES

    for ext in IMAGE_SUFFIXES:
        for e in (ext, ext.upper()):
            p = gt_dir / f"{stem}{suffix}{e}"
            if p.exists():
                return p
    return None


@main.command("eval")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--masks", "gt_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of ground-truth label images <stem>_masks.tif.")
@click.option("--model", "model_ref", default=None,
              help="Model for inputs that are images (default: generalist); 'auto': the zoo "
                   "model each image's style selects (reported per image and per group).")
@click.option("--selector", default=None,
              help="Style selector plugin for --model auto (default: nearest-centroid).")
@click.option("--diameter", type=float, default=0.0, show_default=True,
              help="Diameter for images to segment; 0 = size model.")
@click.option("--true-diameter", is_flag=True,
              help="Segment each image at the median diameter of its ground-truth objects "
                   "(what the size model could reach at best).")
@click.option("--channels", nargs=2, type=int, default=(0, 0), show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              show_default=True, help="As for segment: auto = bf16 where the CPU has it natively.")
@click.option("--stems", "stems_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Only evaluate the stems listed in this file (one per line).")
@click.option("--group-by", default=None, metavar="CSV:COLUMN",
              help="Also report per group, e.g. metadata.csv:modality (needs a 'stem' column).")
@click.option("--mask-suffix", default="_masks", show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report: .csv (per image + summary rows) or .json.")
@click.option("--threads", type=int, default=None)
@click.option("--axes", default=None, metavar="AXES",
              help="Dimension order of the stored images, as for segment.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_backbone_choice
def eval_cmd(inputs: tuple[Path, ...], gt_dir: Path, model_ref: str | None,
             selector: str | None, diameter: float,
             true_diameter: bool, channels: tuple[int, int], precision: str,
             stems_file: Path | None,
             group_by: str | None, mask_suffix: str, out_path: Path | None, threads: int | None,
             axes: str | None, quiet: bool, backbone: str | None = None,
             backbone_options: tuple[str, ...] = (), reconstructor: str | None = None) -> None:
    """Score predictions (or segment images, then score) against ground-truth masks.

    Reports AP at IoU 0.50...0.95 (TP / (TP + FP + FN)), precision, recall and F1 at 0.5, per
    image, per group and overall (mean of per-image scores, and pooled counts).
    """
    from tqdm import tqdm

    from . import io
    from .evaluate import EvalReport, read_groups

    items = _eval_inputs(inputs, mask_suffix)
    if stems_file is not None:
        keep = set(stems_file.read_text().split())
        items = [it for it in items if it[0] in keep]
    if not items:
        raise CellplugError("nothing to evaluate (no inputs left after --stems)")
    try:
        groups = read_groups(group_by) if group_by else {}
    except (OSError, ValueError) as exc:
        raise CellplugError(f"--group-by: {exc}") from None
    segmenter = None
    if not all(is_pred for _, _, is_pred in items):
        from .segmenter import SegmentOptions, median_diameter

        segmenter = _segmenter(model_ref, selector, threads, backbone,
                               _key_values(backbone_options, "--backbone-option"),
                               reconstructor)
        opts = SegmentOptions(diameter=diameter, channels=_channels(channels),
                              precision=precision)
    from .metrics import DEFAULT_THRESHOLDS

    report = EvalReport(DEFAULT_THRESHOLDS)
    failed = 0
    for stem, path, is_pred in tqdm(items, desc="evaluating", unit="image", disable=quiet):
        truth = _find_truth(gt_dir, stem, mask_suffix)
        if truth is None:
            msg = f"{path}: no ground truth {stem}{mask_suffix}.* in {gt_dir}"
            _report(f"error: {msg}")
            report.fail(stem, msg)
            failed += 1
            continue
        extra: dict[str, Any] = {}
        try:
            gt = io.read_labels(truth)
            if is_pred:
                pred = io.read_labels(path)
            else:
                assert segmenter is not None
                image = io.read_image(path, axes=axes)
                if true_diameter:
                    d = median_diameter(gt)
                    if not d > 0:
                        raise CellplugError(f"{truth}: no objects, so no true diameter")
                    result, choice = _segment_one(segmenter, image, opts, diameter=d)
                else:
                    result, choice = _segment_one(segmenter, image, opts)
                pred = result.labels
                if choice is not None:
                    extra = {"model": choice.model, "similarity": choice.similarity}
            if pred.shape != gt.shape:
                raise CellplugError(
                    f"{path}: shape {pred.shape} differs from ground truth {gt.shape}"
                )
        except CellplugError as exc:
            msg = _one_line(exc)
            if str(path) not in msg and str(truth) not in msg:
                msg = f"{path}: {msg}"
            _report_error(exc, f"error: {msg}")
            report.fail(stem, msg)
            failed += 1
            continue
        report.add(stem, gt, pred, groups.get(stem, ""), **extra)
    if not report.rows:
        raise CellplugError("no image could be evaluated")
    doc = report.to_dict()
    if segmenter is not None:  # which plugins made the predictions
        doc["plugins"] = _plugin_record(segmenter)
    rows = [("overall", doc["overall"])] + [(f"  {g}", v) for g, v in doc["groups"].items()]
    click.echo(f"{'':<24} {'images':>6} {'AP@0.50':>8} {'AP@0.75':>8} {'AP@0.90':>8} "
               f"{'prec':>6} {'recall':>6} {'F1':>6}")
    for name, v in rows:
        m = v["mean_ap"]
        click.echo(f"{name:<24} {v['n_images']:>6} {m['0.50']:>8.3f} {m['0.75']:>8.3f} "
                   f"{m['0.90']:>8.3f} {v['precision@0.50']:>6.3f} {v['recall@0.50']:>6.3f} "
                   f"{v['f1@0.50']:>6.3f}")
    if "by_model" in doc:  # --model auto: which model segmented which group
        _print_by_model(doc["by_model"])
    if out_path is not None:
        try:
            if out_path.suffix.lower() == ".csv":
                report.write_csv(out_path)
            else:
                io.write_json(out_path, doc)
        except OSError as exc:
            raise CellplugError(f"cannot write {out_path} ({exc.strerror or exc})") from None
        click.echo(f"report: {out_path}", err=True)
    if failed:
        raise SystemExit(1)


def _print_by_model(by_model: dict[str, dict[str, Any]]) -> None:
    """The eval report's chosen model x group table: images and AP@0.50 in each cell."""
    click.echo("\nchosen model x group (images, mean AP@0.50):")
    groups = sorted({g for cells in by_model.values() for g in cells})
    click.echo(f"{'model':<24}" + "".join(f" {g[:18]:>18}" for g in groups))
    for model, cells in by_model.items():
        row = "".join(
            f" {cells[g]['n_images']:>7} {cells[g]['mean_ap@0.50']:>10.3f}" if g in cells
            else f" {'':>18}" for g in groups)
        click.echo(f"{model:<24}{row}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
