"""The standalone way: ImageJ macros in ``<Fiji.app>/plugins/Cellplug/`` that run the
``cellplug`` command line.

``cellplug fiji install PATH`` writes ``Segment.ijm`` and ``Train_from_ROI_Manager.ijm``
(ImageJ shows them as ``Plugins > Cellplug > Segment`` and ``... > Train from ROI Manager``,
in Fiji and in plain ImageJ 1.x alike). Each macro copies the active image (and the ROI
Manager's ROIs) into a new temporary folder, runs ``cellplug fiji segment`` or ``cellplug
fiji train`` there, with the absolute path of the ``cellplug`` executable written in at
install time (a Fiji started from the desktop does not see a virtual environment's PATH),
brings the labels and ROIs back, and deletes the folder, also when the command failed. The
command writes its error line into ``error.txt`` of that folder, and the macro shows it.

The dialog fields are :data:`cellplug_fiji.commands.COMMANDS`, as in the in-process way, so
recorded macro lines run the same in both.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from cellplug.errors import CellplugError

from . import __version__, commands

FOLDER = "Cellplug"
MARKER = "// cellplug-fiji macro"
FILES = {commands.SEGMENT: "Segment.ijm", commands.TRAIN: "Train_from_ROI_Manager.ijm"}


def cellplug_executable() -> Path:
    """The ``cellplug`` script of this Python environment (beside its interpreter), else the
    one on PATH; absolute, since ImageJ runs it without this shell's PATH."""
    name = "cellplug.exe" if os.name == "nt" else "cellplug"
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("cellplug")
    if found is None:
        raise CellplugError("cannot find the cellplug executable (not beside "
                            f"{sys.executable}, not on PATH); give --cellplug PATH")
    return Path(found).absolute()


def _macro_string(text: str) -> str:
    """``text`` as an ImageJ macro string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dialog(command: str) -> tuple[str, str]:
    """The macro lines that build the command's dialog, and those that read it back into
    variables ``v_<key>`` (numbers and strings are read back in their own order)."""
    add, get = [], []
    for f in commands.COMMANDS[command]:
        if f.kind == "string":
            add.append(f"Dialog.addString({_macro_string(f.label)}, "
                       f"{_macro_string(str(f.default))}, 20);")
            get.append(f"v_{f.key} = String.trim(Dialog.getString());")
        else:
            add.append(f"Dialog.addNumber({_macro_string(f.label)}, {f.default}, {f.digits}, "
                       f"8, {_macro_string(f.units)});")
            get.append(f"v_{f.key} = Dialog.getNumber();")
    return "\n".join(add), "\n".join(get)


_COMMON = r"""
// A new, empty temporary folder for this run.
function cellplugTemp() {
    base = getDirectory("temp");
    do {
        dir = base + "cellplug-" + getTime() + "-" + round(random * 1000000) + File.separator;
    } while (File.exists(dir));
    File.makeDirectory(dir);
    if (!File.exists(dir)) exit("Cellplug: cannot create a temporary folder in " + base);
    return dir;
}

// Delete the temporary folder and what is in it.
function cellplugCleanup(dir) {
    list = getFileList(dir);
    for (i = 0; i < list.length; i++)
        ok = File.delete(dir + list[i]);
    ok = File.delete(dir);
}

// Show why cellplug failed (its error line), clean up, stop.
function cellplugFail(dir, output) {
    message = "";
    if (File.exists(dir + "error.txt"))
        message = String.trim(File.openAsString(dir + "error.txt"));
    if (message == "")
        message = "cellplug did not run or gave no result.\n" + String.trim(output);
    cellplugCleanup(dir);
    showMessage("Cellplug", "cellplug failed:\n" + message);
    exit();
}

// Save a copy of the active image (all its planes, without its selection) as input.tif.
function cellplugSaveInput(dir) {
    source = getImageID();
    hadSelection = selectionType() != -1;
    batch = is("batch mode");
    setBatchMode(true);
    run("Select None");
    run("Duplicate...", "title=[cellplug input] duplicate");
    saveAs("Tiff", dir + "input.tif");
    close();
    selectImage(source);
    if (hadSelection) run("Restore Selection");
    setBatchMode(batch);
    return dir + "input.tif";
}

function cellplugStem(title) {
    dot = lastIndexOf(title, ".");
    if (dot > 0) return substring(title, 0, dot);
    return title;
}
"""

_SEGMENT = r"""
if (nImages == 0) exit("Cellplug Segment: no image is open");
Dialog.create("Cellplug Segment");
Dialog.addMessage("Models: see `cellplug models list`");
@DIALOG@
Dialog.show();
@GET@
source = getImageID();
title = getTitle();
getVoxelSize(pixelWidth, pixelHeight, pixelDepth, xUnit);
Stack.getUnits(xUnit, yUnit, zUnit, timeUnit, valueUnit);
frameInterval = Stack.getFrameInterval();
dir = cellplugTemp();
input = cellplugSaveInput(dir);
showStatus("cellplug: segmenting " + title + " with " + v_model + "...");
output = exec(CELLPLUG, "fiji", "segment", input, "--out", dir, "--model", v_model,
    "--diameter", d2s(v_diameter, 9), "--channels", d2s(v_cyto, 0), d2s(v_nucleus, 0),
    "--flow-threshold", d2s(v_flow, 9), "--cellprob-threshold", d2s(v_cellprob, 9));
if (!File.exists(dir + "labels.tif"))
    cellplugFail(dir, output);
open(dir + "labels.tif");
rename(cellplugStem(title) + "-labels");
// the source's calibration, exactly (the TIFF's resolution tags are rounded rationals)
setVoxelSize(pixelWidth, pixelHeight, pixelDepth, xUnit);
Stack.setYUnit(yUnit);
Stack.setZUnit(zUnit);
Stack.setTUnit(timeUnit);
Stack.setFrameInterval(frameInterval);
labels = getImageID();
roiManager("reset");
if (File.exists(dir + "RoiSet.zip")) roiManager("Open", dir + "RoiSet.zip");  // none: no objects
count = roiManager("count");
selectImage(source);
if (count > 0) run("From ROI Manager");
else run("Remove Overlay");
cellplugCleanup(dir);
selectImage(labels);
showStatus("cellplug: " + count + " objects in " + title + " (" + v_model + ")");
"""

_TRAIN = r"""
if (nImages == 0) exit("Cellplug Train from ROI Manager: no image is open");
if (roiManager("count") == 0)
    exit("Cellplug Train from ROI Manager: the ROI Manager is empty: add the (corrected) "
        + "outlines of the objects of this image first");
Dialog.create("Cellplug Train from ROI Manager");
@DIALOG@
Dialog.show();
@GET@
title = getTitle();
Stack.getPosition(channel, slice, frame);
dir = cellplugTemp();
input = cellplugSaveInput(dir);
roiManager("Deselect");
roiManager("Save", dir + "RoiSet.zip");
showStatus("cellplug: training from " + v_base + " on " + roiManager("count")
    + " ROIs (see the Log when done)...");
output = exec(CELLPLUG, "fiji", "train", input, dir + "RoiSet.zip", "--out", dir,
    "--base", v_base, "--name", v_name, "--epochs", d2s(v_epochs, 0),
    "--channels", d2s(v_cyto, 0), d2s(v_nucleus, 0), "--current", d2s(frame, 0), d2s(slice, 0),
    "--stem", cellplugStem(title));
if (!File.exists(dir + "model.txt"))
    cellplugFail(dir, output);
model = String.trim(File.openAsString(dir + "model.txt"));
cellplugCleanup(dir);
print("cellplug: " + model);
showStatus("cellplug: " + model);
"""

_TEMPLATES = {commands.SEGMENT: _SEGMENT, commands.TRAIN: _TRAIN}


def macro_text(command: str, cellplug: Path) -> str:
    """The macro file for ``command``, calling ``cellplug`` (an absolute path)."""
    add, get = _dialog(command)
    body = _TEMPLATES[command].replace("@DIALOG@", add).replace("@GET@", get)
    header = (f"{MARKER} {__version__}: Plugins > {FOLDER} > {command}.\n"
              f"// Written by `cellplug fiji install`; `cellplug fiji uninstall` removes it.\n"
              f"// Runs the cellplug command line on a copy of the active image.\n"
              f"var CELLPLUG = {_macro_string(str(cellplug))};\n")
    return header + body + _COMMON


def _plugins_dir(app: Path) -> Path:
    """``app/plugins``: a Fiji.app or ImageJ folder has one."""
    if app.name == "plugins" and app.is_dir():
        return app
    plugins = app / "plugins"
    if not plugins.is_dir():
        raise CellplugError(f"{app}: not a Fiji or ImageJ folder (it has no plugins/ folder); "
                            f"give the Fiji.app (or ImageJ) folder")
    return plugins


def _is_ours(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8", errors="replace").startswith(MARKER)
    except OSError:
        return False


def install(app: Path, cellplug: Path | None = None, force: bool = False) -> list[Path]:
    """Write the macros into ``app/plugins/Cellplug/``; returns their paths.

    A file there that this package did not write is replaced only with ``force``.
    """
    cellplug = Path(cellplug).absolute() if cellplug else cellplug_executable()
    if not cellplug.is_file():
        raise CellplugError(f"{cellplug}: no such file (the cellplug executable)")
    folder = _plugins_dir(Path(app)) / FOLDER
    targets = {command: folder / name for command, name in FILES.items()}
    for target in targets.values():
        if target.exists() and not _is_ours(target) and not force:
            raise CellplugError(f"{target}: exists and was not written by cellplug-fiji; not "
                                f"replaced (use --force to replace it)")
    from cellplug.io import atomic_paths

    try:
        with atomic_paths(list(targets.values())) as temps:  # both or neither
            for (command, _), tmp in zip(targets.items(), temps, strict=True):
                tmp.write_text(macro_text(command, cellplug), encoding="utf-8")
    except OSError as exc:
        raise CellplugError(f"cannot write into {folder} ({exc.strerror or exc})") from None
    return list(targets.values())


def uninstall(app: Path) -> list[Path]:
    """Remove the macros (and the folder, when empty); returns what was removed."""
    folder = _plugins_dir(Path(app)) / FOLDER
    removed = []
    for name in FILES.values():
        target = folder / name
        if target.exists():
            if not _is_ours(target):
                raise CellplugError(f"{target}: was not written by cellplug-fiji; left alone")
            target.unlink()
            removed.append(target)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return removed


def temp_dirs_left(tmp: str | os.PathLike[str] | None = None) -> list[Path]:
    """``cellplug-*`` folders in the temporary folder (macros leave none)."""
    return sorted(Path(tmp or tempfile.gettempdir()).glob("cellplug-*"))
