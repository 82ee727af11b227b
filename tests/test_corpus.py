"""Every case of the bad-input corpus (tests/data/bad/make_corpus.py) through every entry point.

For each (case, entry point) the expected outcome is an exit code and a message pattern; the
test also asserts the rules that hold for all of them:

- a failure is one ``error:`` line that names the file (no traceback without ``--debug``);
- the exit code is non-zero exactly when something failed;
- no partial output, and results of an earlier run are neither removed nor changed;
- a pickled payload never runs;
- the run finishes within :data:`TIME_LIMIT` seconds.

``CELLPLUG_WRITE_ROBUSTNESS=1 pytest tests/test_corpus.py`` also writes the table of outcomes to
docs/robustness.md (case x entry point -> exit code and message).

Entry points: ``segment``, ``eval`` and ``train`` (the CLI, in-process), ``source`` (annotation
sources, ``cellplug.annotations.read_annotations``) and ``api`` (``cellplug.io.read_image``, then
``Segmenter.segment`` on the array; ``Segmenter.from_model`` for model cases). Bridges add
their own entry points here as they land.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from cellplug_testutils import load_data_module
from click.testing import CliRunner

from cellplug.cli import main
from cellplug.errors import CellplugError
from cellplug.plugins import set_registry

HERE = Path(__file__).resolve().parent
corpus = load_data_module("bad/make_corpus.py")

TIME_LIMIT = 60.0
DOC = HERE.parent / "docs" / "robustness.md"
OUTCOMES: dict[tuple[str, str], str] = {}  # (case, entry) -> "exit N: message" for the doc

# -- expectations ------------------------------------------------------------------------------
# (exit code, pattern of the error line after "<file>: "); None = success (exit 0, no error line)
READ_ERRORS = {
    "tiff_corrupt": "not a readable TIFF",
    "tiff_truncated": "not a readable TIFF",
    "tiff_zero_bytes": r"empty file \(0 bytes\)",
    "png_corrupt": "not a readable image",
    "png_truncated": "not a readable image",
    "png_zero_bytes": r"empty file \(0 bytes\)",
    "tiff_declares_100000": r"image of shape \(100000, 100000\) uint8 needs 9.3 GiB",
    "nan_values": "image contains NaN values",
    "inf_values": "image contains infinite values",
    "overflow_float64": "exceed what float32 can represent",
    "overflow_float32": "exceed what float32 can represent",
    "zero_by_n": r"image is empty \(shape \(0, 32\)\)",
    "five_d": "got axes TZCYX .*z-stacks and time series are not supported",
    "zstack": "got axes ZYX .*z-stacks and time series are not supported",
    "text_file_as_tif": "not a readable TIFF",
    "directory_named_tif": "directory contains no image files",
    "missing_file": "no such file",
    "empty_folder": "directory contains no image files",
}
ODD_BUT_VALID = {"one_pixel", "constant", "stack_without_axes"}  # segment to 0+ objects
WARNS = {"stack_without_axes": "no axis metadata; reading its 5 planes as channels"}

MODEL_ERRORS = {
    "pth_pickle_payload": "refused to load: the file contains pickled objects other than tensors",
    "size_npy_pickle_payload": r"_size.npy: not a readable Cellpose size model \(global "
                               r"posix.system is not allowed\)",
    "not_a_model": "not a model weights file",
    "meta_unreadable_json": r"\.json: unreadable model metadata",
    "meta_diam_mean_text": r"\.json: field 'diam_mean' must be a positive number, got 'thirty'",
    "meta_diam_mean_zero": r"\.json: field 'diam_mean' must be a positive number, got 0",
    "meta_diam_mean_negative": r"\.json: field 'diam_mean' must be a positive number, got -30",
    "meta_n_channels_wrong": r"\.json: field 'n_channels' is 3, the weights take 2 input",
    "meta_size_model_missing_key": r"\.json: field 'size_model': size model lacks smean",
    "meta_size_model_wrong_shape": r"\.json: field 'size_model' has vectors of length 100, the "
                                   r"network's style vector has 256",
    "cellpose_size_npy_wrong_shape": r"cellpose_size_shape: field 'size_model' has vectors of "
                                     r"length 10",
    "meta_backbone_options_unknown": r"\.json: field 'backbone_options' .*rejected by backbone "
                                     r"'cellpose-unet' \(TypeError: .*'depth'",
    "meta_backbone_options_ill_typed": r"\.json: field 'backbone_options' says n_channels='two', "
                                       r"the weights have n_channels=2",
}
assert set(READ_ERRORS) | ODD_BUT_VALID == set(corpus.IMAGE_CASES)
assert set(MODEL_ERRORS) == set(corpus.MODEL_CASES)


@pytest.fixture(autouse=True)
def fresh_registry():
    set_registry(None)
    yield
    set_registry(None)


@pytest.fixture(scope="module", autouse=True)
def write_table():
    yield
    if os.environ.get("CELLPLUG_WRITE_ROBUSTNESS"):
        _write_doc()


def _norm(text: str, *roots: Path) -> str:
    """Stable text for the doc: temporary folders left out of paths."""
    for root in roots:
        text = text.replace(str(root) + os.sep, "").replace(str(root), "")
    return re.sub(r"\s+", " ", text)


def _previous_results(out: Path) -> dict[str, bytes]:
    """An earlier run's results in ``out``, which a failed run must leave as they are."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "earlier_masks.tif").write_bytes(b"earlier result")
    (out / "summary.json").write_text('{"earlier": true}\n')
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _cli(args: list[str | Path], env: dict[str, str] | None = None):
    t0 = time.perf_counter()
    result = CliRunner(catch_exceptions=False).invoke(main, [str(a) for a in args], env=env)
    seconds = time.perf_counter() - t0
    assert seconds < TIME_LIMIT, f"took {seconds:.0f} s"
    assert "Traceback" not in result.output
    return result


def _errors(result) -> list[str]:
    return [ln[len("error: "):] for ln in result.stderr.splitlines() if ln.startswith("error: ")]


def _check_one_error(result, path: Path, pattern: str, root: Path, case: str, entry: str):
    errs = _errors(result)
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert len(errs) == 1, errs
    assert str(path) in errs[0], f"error does not name {path}: {errs[0]}"
    assert re.search(pattern, errs[0]), (pattern, errs[0])
    OUTCOMES[case, entry] = f"exit 1: {_norm(errs[0], root)}"


def _no_payload(root: Path) -> None:
    assert not list(root.rglob(corpus.PAYLOAD_SENTINEL)), "a pickled payload ran"


# -- image cases -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("corpus")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns about writing the 0 x 32 image
        return root, corpus.make_all(root)


@pytest.mark.parametrize("case", sorted(corpus.IMAGE_CASES))
def test_segment(case, cases, tmp_path):
    root, paths = cases
    path = paths[case]
    out = tmp_path / "out"
    before = _previous_results(out)
    result = _cli(["segment", path, "--out", out, "--json", "-q", "--tile", "off"])
    if case in ODD_BUT_VALID:
        assert result.exit_code == 0 and not _errors(result), result.output
        assert (out / f"{path.stem}_masks.tif").is_file()
        OUTCOMES[case, "segment"] = "exit 0: segmented" + (
            f"; warning: {_norm(result.stderr.split('warning: ')[-1], root)}" if case in WARNS
            else "")
        if case in WARNS:
            assert WARNS[case] in result.stderr
        return
    _check_one_error(result, path, READ_ERRORS[case], root, case, "segment")
    now = {p.name: p.read_bytes() for p in out.iterdir()}
    assert now == before, "a failed run changed or removed earlier results, or left files"


@pytest.mark.parametrize("case", sorted(corpus.IMAGE_CASES))
def test_eval(case, cases, tmp_path):
    root, paths = cases
    path = paths[case]
    truth = tmp_path / "truth"
    truth.mkdir()
    report = tmp_path / "report.json"
    if case in ODD_BUT_VALID:
        from cellplug.io import read_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shape = read_image(path).shape[:2]
        tifffile.imwrite(truth / f"{path.stem}_masks.tif", np.zeros(shape, np.uint16))
    else:
        shutil.copy(corpus.EXAMPLE_MASKS, truth / f"{path.stem}_masks.tif")
    result = _cli(["eval", path, "--masks", truth, "-q", "--out", report])
    if case in ODD_BUT_VALID:
        assert result.exit_code == 0 and not _errors(result), result.output
        OUTCOMES[case, "eval"] = "exit 0: scored"
        return
    if case in ("missing_file", "empty_folder", "directory_named_tif"):
        # nothing at all to evaluate: the run stops before any report
        assert result.exit_code == 1 and len(_errors(result)) == 1
        assert str(path) in _errors(result)[0]
        assert re.search(READ_ERRORS[case] if case == "missing_file" else "no images or label",
                         _errors(result)[0])
        OUTCOMES[case, "eval"] = f"exit 1: {_norm(_errors(result)[0], root)}"
        assert not report.exists()
        return
    # the image fails; with no other image nothing can be scored: a second line says so
    errs = _errors(result)
    assert result.exit_code == 1 and len(errs) == 2, result.output
    assert str(path) in errs[0] and re.search(READ_ERRORS[case], errs[0]), errs
    assert errs[1] == "no image could be evaluated"
    OUTCOMES[case, "eval"] = f"exit 1: {_norm(errs[0], root)}"
    assert not report.exists()


def _train_folder(path: Path, tmp_path: Path, case: str) -> Path:
    """A training folder holding the case's file as an image, with a label file beside it."""
    folder = tmp_path / "train"
    folder.mkdir()
    if case == "missing_file":
        return folder / "missing"
    if path.is_dir():
        shutil.copytree(path, folder / path.name)
        return folder / path.name
    shutil.copy(path, folder / path.name)
    shape = (64, 64)
    if case in ODD_BUT_VALID:
        from cellplug.io import read_image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shape = read_image(path).shape[:2]
    tifffile.imwrite(folder / f"{path.stem}_masks.tif", np.zeros(shape, np.uint16))
    return folder


TRAIN = ["--base", "generalist", "--epochs", "1", "--patch", "32", "--batch-size", "1",
         "--size-epochs", "1", "-q"]


@pytest.mark.parametrize("case", sorted(corpus.IMAGE_CASES))
def test_train(case, cases, tmp_path):
    root, paths = cases
    path = paths[case]
    folder = _train_folder(path, tmp_path, case)
    model = tmp_path / "models" / "new.pth"
    result = _cli(["train", folder, "--out", model, *TRAIN])
    assert not model.parent.exists() or not list(model.parent.iterdir()), "partial model"
    if case in ("missing_file",):
        assert result.exit_code == 2 and "does not exist" in result.output  # click's own check
        assert "Traceback" not in result.output
        OUTCOMES[case, "train"] = "exit 2: (usage) path does not exist"
        return
    errs = _errors(result)
    assert result.exit_code == 1 and len(errs) == 1, result.output
    if case in ("empty_folder", "directory_named_tif"):
        assert "no annotation source can read this" in errs[0] and str(folder) in errs[0]
    elif case in ODD_BUT_VALID:  # readable, but an empty label image gives nothing to learn
        assert errs[0] == "no training images (with enough objects) to train on", errs
    else:
        assert str(folder / path.name) in errs[0] and re.search(READ_ERRORS[case], errs[0]), errs
    OUTCOMES[case, "train"] = f"exit 1: {_norm(errs[0], root, tmp_path)}"


@pytest.mark.parametrize("case", sorted(corpus.IMAGE_CASES))
def test_annotation_source(case, cases, tmp_path):
    from cellplug.annotations import read_annotations

    root, paths = cases
    folder = _train_folder(paths[case], tmp_path, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case in ODD_BUT_VALID:
            anns = list(read_annotations(folder))
            assert len(anns) == 1 and anns[0].labels.max() == 0
            OUTCOMES[case, "source"] = "read"
            return
        with pytest.raises(CellplugError) as exc:
            list(read_annotations(folder))
    msg = str(exc.value)
    assert "\n" not in msg and str(folder) in msg
    OUTCOMES[case, "source"] = f"CellplugError: {_norm(msg, tmp_path)}"


@pytest.fixture(scope="module")
def segmenter():
    from cellplug.segmenter import Segmenter

    return Segmenter.from_model("generalist")


@pytest.mark.parametrize("case", sorted(corpus.IMAGE_CASES))
def test_python_api(case, cases, segmenter):
    from cellplug.io import read_image

    root, paths = cases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case in ODD_BUT_VALID:
            result = segmenter.segment(read_image(paths[case]), tile=False)
            assert result.labels.shape == read_image(paths[case]).shape[:2]
            OUTCOMES[case, "api"] = f"{result.n_objects} objects"
            return
        with pytest.raises(CellplugError) as exc:
            segmenter.segment(read_image(paths[case]))
    msg = str(exc.value)
    pattern = "is a directory, expected an image file" if paths[case].is_dir() else (
        READ_ERRORS[case])
    assert "\n" not in msg and str(paths[case]) in msg and re.search(pattern, msg)
    OUTCOMES[case, "api"] = f"CellplugError: {_norm(msg, root)}"


ARRAYS = {  # what the Python API gets without a file: the checks must not depend on io
    "nan": np.where(np.eye(32, dtype=bool), np.nan, 1.0),
    "inf": np.where(np.eye(32, dtype=bool), np.inf, 1.0),
    "overflow64": np.linspace(-1e300, 1e300, 1024).reshape(32, 32),
    "overflow32": np.where(np.eye(32, dtype=bool), np.float32(3e38), np.float32(-3e38)),
    "0xN": np.zeros((0, 32), np.uint8),
    "5-D": np.zeros((1, 2, 3, 32, 32), np.uint8),
    "complex": np.zeros((32, 32), np.complex64),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_python_api_arrays(name, segmenter):
    with pytest.raises(CellplugError) as exc:
        segmenter.segment(ARRAYS[name])
    assert "\n" not in str(exc.value)
    OUTCOMES[f"array {name}", "api"] = f"CellplugError: {exc.value}"


# -- annotation cases --------------------------------------------------------------------------
ANNOTATION_ERRORS = {
    "seg_npy_pickle_payload": r"cells_seg.npy: not a readable Cellpose _seg.npy file \(global "
                              r"posix.system is not allowed\)",
    "seg_npy_3d_masks": r"cells_seg.npy: 'masks' must be a 2-D integer label image",
    "seg_npy_shape_mismatch": r"cells_seg.npy: labels \(100, 100\) do not match image "
                              r"\(360, 360\)",
    "roi_zip_corrupt": r"cells_RoiSet.zip: not a readable ImageJ ROI file",
    "masks_negative_labels": r"cells_masks.tif: label image has negative values",
    "masks_fractional_labels": r"cells_masks.tif: label image has non-integer values",
}
assert set(ANNOTATION_ERRORS) == set(corpus.ANNOTATION_CASES)


@pytest.mark.parametrize("case", sorted(corpus.ANNOTATION_CASES))
@pytest.mark.parametrize("entry", ["train", "source"])
def test_annotations(case, entry, cases, tmp_path):
    from cellplug.annotations import read_annotations

    root, paths = cases
    folder = paths[case]
    if entry == "source":
        with pytest.raises(CellplugError) as exc:
            list(read_annotations(folder))
        msg = str(exc.value)
        assert "\n" not in msg and str(folder) in msg and re.search(ANNOTATION_ERRORS[case], msg)
        OUTCOMES[case, entry] = f"CellplugError: {_norm(msg, root)}"
    else:
        model = tmp_path / "m" / "new.pth"
        result = _cli(["train", folder, "--out", model, *TRAIN])
        _check_one_error(result, folder, ANNOTATION_ERRORS[case], root, case, entry)
        assert not model.parent.exists()
    _no_payload(root)


# -- model cases -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(corpus.MODEL_CASES))
@pytest.mark.parametrize("entry", ["segment", "eval", "train", "models add", "api"])
def test_model(case, entry, cases, tmp_path):
    root, paths = cases
    model = paths[case]
    image = corpus.EXAMPLE
    out = tmp_path / "out"
    before = _previous_results(out)
    if entry == "api":
        from cellplug.segmenter import Segmenter

        with pytest.raises(CellplugError) as exc:
            Segmenter.from_model(str(model))
        msg = str(exc.value)
        assert "\n" not in msg and re.search(MODEL_ERRORS[case], msg), msg
        OUTCOMES[case, entry] = f"CellplugError: {_norm(msg, root)}"
    else:
        args = {
            "segment": ["segment", image, "--model", model, "--out", out, "-q"],
            "eval": ["eval", image, "--masks", corpus.EXAMPLE_MASKS.parent, "--model", model,
                     "-q", "--out", out / "report.json"],
            "train": ["train", corpus.EXAMPLE_MASKS.parent, "--base", model, "--out",
                      out / "new.pth", *TRAIN[2:]],
            "models add": ["models", "add", model, "--name", "added"],
        }[entry]
        zoo = tmp_path / "zoo"
        result = _cli(args, env={"CELLPLUG_MODELS": str(zoo)})
        assert not zoo.exists() or not list(zoo.iterdir()), "models add copied something"
        _check_one_error(result, model.parent, MODEL_ERRORS[case], root, case, entry)
    _no_payload(root)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_broken_json_in_user_models_does_not_disable_the_default(cases, tmp_path):
    """Issue 17, item 4: one unreadable JSON in the user model folder is skipped, with a
    warning, by ``models list`` and by ``segment`` with the default model."""
    root, paths = cases
    user = tmp_path / "user_models"
    user.mkdir()
    shutil.copy(paths["meta_unreadable_json"], user / "mine.pth")
    (user / "mine.json").write_text("{not json")
    env = {"CELLPLUG_MODELS": str(user)}
    listed = _cli(["models", "list"], env=env)
    assert listed.exit_code == 0 and "generalist" in listed.stdout
    assert "warning: skipped user model 'mine'" in listed.stderr
    seg = _cli(["segment", corpus.EXAMPLE, "--out", tmp_path / "o", "-q"], env=env)
    assert seg.exit_code == 0 and (tmp_path / "o" / "nuclei_masks.tif").is_file()
    named = _cli(["segment", corpus.EXAMPLE, "--model", "mine", "--out", tmp_path / "p", "-q"],
                 env=env)
    assert named.exit_code == 1 and "mine.json: unreadable model metadata" in named.stderr
    OUTCOMES["broken JSON in user model folder", "segment"] = (
        "exit 0: default model used; warning: skipped user model 'mine': ...")


# -- the doc -----------------------------------------------------------------------------------
def _write_doc() -> None:
    entries = ["segment", "eval", "train", "models add", "source", "api"]
    rows = sorted({case for case, _ in OUTCOMES})
    lines = [
        "# Robustness: what each bad input gives, at each entry point",
        "",
        "Generated by `CELLPLUG_WRITE_ROBUSTNESS=1 pytest tests/test_corpus.py` from the corpus in",
        "`tests/data/bad/make_corpus.py`; the same test, in the default run, asserts the rules:",
        "one `error:` line naming the file, a non-zero exit, no traceback without `--debug`, no",
        "partial output and earlier results untouched, no pickled payload run, under "
        f"{TIME_LIMIT:.0f} s.",
        "Paths are shown relative to the case's folder. Exit codes: 0 ok, 1 a failed input, "
        "2 a usage error (click), 130 Ctrl-C, 143 SIGTERM, 70 an internal error (a bug).",
        "",
        "| case | " + " | ".join(entries) + " |",
        "| --- | " + " | ".join("---" for _ in entries) + " |",
    ]
    for case in rows:
        cells = [OUTCOMES.get((case, e), "") .replace("|", "\\|") for e in entries]
        lines.append(f"| `{case}` | " + " | ".join(cells) + " |")
    lines += ["", "Outputs and signals (tests in tests/test_corpus.py):", ""]
    lines += [f"- **{k}**: {v}" for (k, _), v in sorted(EXTRA.items())]
    DOC.write_text("\n".join(lines) + "\n")


EXTRA: dict[tuple[str, str], str] = {}


# -- inputs, outputs and signals (issue 17, items 1-12) ----------------------------------------
def _extra(name: str, text: str) -> None:
    EXTRA[name, ""] = text


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_same_name_inputs_are_refused_before_any_work(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        shutil.copy(corpus.EXAMPLE, tmp_path / d / "img.tif")
    out = tmp_path / "o"
    before = _previous_results(out)
    r = _cli(["segment", tmp_path / "a/img.tif", tmp_path / "b/img.tif", "--out", out, "--json"])
    assert r.exit_code == 1 and _errors(r) == [
        f"{tmp_path / 'a/img.tif'} and {tmp_path / 'b/img.tif'} would both write "
        f"{out / 'img_masks.tif'}; give them different --out folders or rename one (nothing "
        f"was written)"]
    assert _snapshot(out) == before
    # img.png beside img.tif, outputs beside the inputs
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "a/img.png", tifffile.imread(corpus.EXAMPLE))
    r = _cli(["segment", tmp_path / "a"])
    assert r.exit_code == 1 and "would both write" in _errors(r)[0]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["img.png", "img.tif"]
    _extra("same stem twice (a/img.tif b/img.tif --out o; img.png + img.tif)",
           "exit 1 before any work: `a/img.tif and b/img.tif would both write o/img_masks.tif; "
           "give them different --out folders or rename one (nothing was written)`")


def test_missing_input_and_empty_folder_do_not_stop_the_others(tmp_path):
    out = tmp_path / "o"
    (tmp_path / "empty").mkdir()
    r = _cli(["segment", corpus.EXAMPLE, tmp_path / "missing.tif", tmp_path / "empty",
              "--out", out, "--json", "-q"])
    assert r.exit_code == 1
    assert _errors(r) == [f"{tmp_path / 'missing.tif'}: no such file",
                          f"{tmp_path / 'empty'}: directory contains no image files"]
    assert (out / "nuclei_masks.tif").is_file()
    import json

    doc = json.loads((out / "summary.json").read_text())
    assert [e.get("error") for e in doc["images"]] == [
        f"{tmp_path / 'missing.tif'}: no such file",
        f"{tmp_path / 'empty'}: directory contains no image files", None]
    assert doc["images"][2]["objects"] > 5 and doc["failed"] == 2
    _extra("missing file / empty folder among the inputs",
           "exit 1; one error line each, the other images are segmented; summary.json lists "
           "the failures with their error")


@pytest.mark.parametrize("diameter", ["1e-6", "0.05", "0.5"])
def test_tiny_diameter_is_refused_quickly(diameter, tmp_path):
    t0 = time.perf_counter()
    r = _cli(["segment", corpus.EXAMPLE, "--out", tmp_path / "o", "--diameter", diameter, "-q"])
    assert time.perf_counter() - t0 < 20
    assert r.exit_code == 1 and len(_errors(r)) == 1
    assert _errors(r)[0].startswith(f"{corpus.EXAMPLE}: diameter {float(diameter):g} px is too "
                                    f"small for this model (diam_mean 17)")
    assert "give a diameter of at least 1.7 px" in _errors(r)[0]
    assert not (tmp_path / "o").exists()
    _extra("--diameter 1e-6 / 0.05 / 0.5", "exit 1 at once: `diameter 0.5 px is too small for "
           "this model (diam_mean 17): the image would be enlarged 34x, at most 10x is allowed; "
           "give a diameter of at least 1.7 px`")


def test_rescaled_image_over_the_memory_budget_is_refused(tmp_path):
    r = _cli(["segment", corpus.EXAMPLE, "--out", tmp_path / "o", "--diameter", "2", "-q"],
             env={"CELLPLUG_MAX_IMAGE_GIB": "0.1"})
    assert r.exit_code == 1 and "would rescale the image to 3060 x 3060 pixels, needing about " \
        "0.3 GiB (limit 0.1 GiB" in _errors(r)[0]


def test_failed_rerun_keeps_the_previous_results(tmp_path):
    out = tmp_path / "o"
    assert _cli(["segment", corpus.EXAMPLE, "--out", out, "-q"]).exit_code == 0
    (out / "nuclei_overlay.png").mkdir()
    before = _snapshot(out)
    r = _cli(["segment", corpus.EXAMPLE, "--out", out, "--save", "overlay", "-q"])
    assert r.exit_code == 1 and _errors(r) == [
        f"{corpus.EXAMPLE}: cannot write {out / 'nuclei_overlay.png'}: it exists and is not a "
        f"file"]
    assert _snapshot(out) == before and (out / "nuclei_overlay.png").is_dir()
    _extra("re-run whose overlay target is a folder", "exit 1; the earlier masks are kept "
           "byte for byte (they used to be deleted)")


def test_summary_json_write_failure_is_one_line(tmp_path):
    out = tmp_path / "o"
    (out / "summary.json").mkdir(parents=True)
    r = _cli(["segment", corpus.EXAMPLE, "--out", out, "--json", "-q"])
    assert r.exit_code == 1 and len(_errors(r)) == 1
    assert _errors(r)[0].startswith(f"cannot write {out / 'summary.json'} (")
    assert _errors(r)[0].endswith("the images' outputs were written")
    assert (out / "nuclei_masks.tif").is_file()
    _extra("summary.json cannot be written", "exit 1, one line: `cannot write o/summary.json "
           "(Is a directory); the images' outputs were written`")


def test_guessed_axes_warn_and_axes_option_decides(cases, tmp_path):
    root, paths = cases
    stack = paths["stack_without_axes"]
    r = _cli(["segment", stack, "--out", tmp_path / "a", "-q"])
    assert r.exit_code == 0 and "warning: " + str(stack) + ": no axis metadata" in r.stderr
    r = _cli(["segment", stack, "--out", tmp_path / "b", "-q", "--axes", "CYX"])
    assert r.exit_code == 0 and "warning" not in r.stderr.replace("broken", "")
    assert np.array_equal(tifffile.imread(tmp_path / "a/stack5_masks.tif"),
                          tifffile.imread(tmp_path / "b/stack5_masks.tif"))
    r = _cli(["segment", stack, "--out", tmp_path / "c", "-q", "--axes", "ZYX"])
    assert r.exit_code == 1 and "got axes ZYX" in _errors(r)[0] and str(stack) in _errors(r)[0]
    r = _cli(["segment", stack, "--out", tmp_path / "d", "-q", "--axes", "YX"])
    assert r.exit_code == 1 and _errors(r) == [
        f"{stack}: axes 'YX' do not fit the stored array of shape (5, 64, 64) (3 dimensions)"]
    _extra("5 x 64 x 64 stack without axis metadata", "exit 0 with `warning: no axis metadata; "
           "reading its 5 planes as channels ...`; `--axes CYX` silences it, `--axes ZYX` gives "
           "the stack error, a wrong `--axes` names the stored shape")


def test_error_lines_start_on_their_own_line_under_a_progress_bar(cases, tmp_path):
    root, paths = cases
    r = _cli(["segment", paths["tiff_corrupt"], corpus.EXAMPLE, paths["nan_values"],
              "--out", tmp_path / "o"])
    assert r.exit_code == 1
    pieces = re.split(r"[\r\n]", r.stderr)
    assert sum(p.startswith("error: ") for p in pieces) == 2
    assert all(p.startswith("error: ") for p in pieces if "error:" in p), pieces


def test_eval_report_lists_failed_images(cases, tmp_path):
    import json

    root, paths = cases
    truth = tmp_path / "truth"
    truth.mkdir()
    shutil.copy(corpus.EXAMPLE_MASKS, truth)
    shutil.copy(corpus.EXAMPLE_MASKS, truth / "corrupt_masks.tif")
    r = _cli(["eval", corpus.EXAMPLE, paths["tiff_corrupt"], "--masks", truth, "-q",
              "--out", tmp_path / "r.json"])
    assert r.exit_code == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [f["image"] for f in doc["failed"]] == ["corrupt"]
    assert "not a readable TIFF" in doc["failed"][0]["error"]
    assert [row["image"] for row in doc["images"]] == ["nuclei"]


def test_train_names_missing_masks(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(corpus.EXAMPLE, folder / "a.tif")
    shutil.copy(corpus.EXAMPLE, folder / "b.tif")
    r = _cli(["train", folder, "--out", tmp_path / "m.pth", *TRAIN])
    errs = _errors(r)
    assert r.exit_code == 1 and len(errs) == 1
    assert errs[0].startswith(f"{folder}: no annotation source can read this (sources: ")
    assert errs[0].endswith("; mask-folder: 2 image(s) without labels, e.g. a.tif (no "
                            "a_masks.tif), b.tif (no b_masks.tif)")
    assert not (tmp_path / "m.pth").exists()


def test_train_options_are_validated(tmp_path):
    r = _cli(["train", corpus.EXAMPLE_MASKS.parent, "--out", tmp_path / "m.pth", "--epochs", "-3"])
    assert r.exit_code == 2 and "-3 is not in the range x>=0" in r.output
    r = _cli(["train", corpus.EXAMPLE_MASKS.parent, "--out", tmp_path / "m.pth", "--epochs", "0"])
    assert r.exit_code == 2 and "without --base that would save an untrained network" in r.output
    r = _cli(["train", corpus.EXAMPLE_MASKS.parent, "--out", tmp_path / "m.pth", "--patch", "100"])
    assert r.exit_code == 2 and "100 is not a multiple of 16" in r.output
    assert not list(tmp_path.iterdir())


def test_one_epoch_trains_and_epochs_0_says_it_did_not(tmp_path):
    import json

    import torch

    r = _cli(["train", corpus.EXAMPLE_MASKS.parent, "--out", tmp_path / "one.pth", *TRAIN,
              "--learning-rate", "0.05", "--warmup-epochs", "10"])
    assert r.exit_code == 0 and "(trained 1 epochs)" in r.stdout
    meta = json.loads((tmp_path / "one.json").read_text())
    assert meta["training"]["history"][0]["lr"] == pytest.approx(0.05)
    new = torch.load(tmp_path / "one.pth", weights_only=True)
    base = torch.load(corpus.BUNDLED, weights_only=True)
    moved = max(float((new[k].float() - base[k].float()).abs().max()) for k in base
                if base[k].is_floating_point() and "running" not in k)
    assert moved > 1e-3  # with lr 0 (the old warm-up) only float16 rounding would differ
    r = _cli(["train", corpus.EXAMPLE_MASKS.parent, "--out", tmp_path / "zero.pth", *TRAIN[:2],
              "--epochs", "0", "--size-epochs", "1", "-q"])
    assert r.exit_code == 0
    assert "(not trained: --epochs 0 kept the weights of generalist" in r.stdout


def test_train_on_error_skip(cases, tmp_path):
    import json

    root, paths = cases
    folder = tmp_path / "pairs"
    folder.mkdir()
    shutil.copy(corpus.EXAMPLE, folder / "good.tif")
    shutil.copy(corpus.EXAMPLE_MASKS, folder / "good_masks.tif")
    shutil.copy(paths["tiff_corrupt"], folder / "bad.tif")
    shutil.copy(corpus.EXAMPLE_MASKS, folder / "bad_masks.tif")
    stop = _cli(["train", folder, "--out", tmp_path / "s.pth", *TRAIN])
    assert stop.exit_code == 1 and str(folder / "bad.tif") in _errors(stop)[0]
    assert not (tmp_path / "s.pth").exists()
    skip = _cli(["train", folder, "--out", tmp_path / "k.pth", *TRAIN, "--on-error", "skip"])
    assert skip.exit_code == 0, skip.output
    errs = _errors(skip)
    assert len(errs) == 1 and errs[0].startswith(f"{folder / 'bad.tif'}: not a readable TIFF (")
    assert errs[0].endswith(") (skipped)")
    meta = json.loads((tmp_path / "k.json").read_text())
    assert meta["training"]["n_train"] == 1 and len(meta["training"]["data"]["skipped"]) == 1


def test_debug_shows_the_traceback(cases):
    root, paths = cases
    cmd = [sys.executable, "-m", "cellplug.cli"]
    plain = subprocess.run([*cmd, "segment", paths["tiff_corrupt"]], capture_output=True,
                           text=True, timeout=120)
    debug = subprocess.run([*cmd, "--debug", "segment", paths["tiff_corrupt"]],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "InputError" in debug.stderr


def test_an_internal_error_is_one_line_with_exit_70(monkeypatch, tmp_path):
    from cellplug.segmenter import Segmenter

    def bug(self, *a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(Segmenter, "segment", bug)
    r = _cli(["segment", corpus.EXAMPLE, "--out", tmp_path / "o"])
    assert r.exit_code == 70 and _errors(r) == [
        "internal error (a bug, please report it): ZeroDivisionError: division by zero (rerun "
        "with --debug for the traceback)"]
    assert not (tmp_path / "o").exists()


def test_sigterm_leaves_no_partial_output(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(12):
        shutil.copy(corpus.EXAMPLE, inputs / f"img{i:02d}.tif")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "cellplug.cli", "segment", inputs, "--out",
                             out, "-q", "--tile", "on", "--precision", "fp32"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and list(out.glob("*_masks.tif"))):
        time.sleep(0.05)
    time.sleep(0.3)  # now in the middle of another image
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "error: terminated; outputs of the image in progress were not written" in err
    assert "Traceback" not in err
    written = sorted(out.iterdir())
    assert written and len(written) < 12
    assert all(not p.name.startswith(".") for p in written), written  # no temporary files
    for p in written:  # every file there is complete
        assert tifffile.imread(p).shape == (360, 360)
    _extra("SIGTERM mid-run", "exit 143, `error: terminated; outputs of the image in progress "
           "were not written`; finished images keep their complete outputs, no temporary files")


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only), or None where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                            str(mnt)], capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full(tmpfs, tmp_path, monkeypatch):
    if tmpfs is None:  # simulate ENOSPC where a tmpfs cannot be mounted
        import cellplug.io as cio

        def full(path, *a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(cio, "_write_tiff", full)
        out = tmp_path / "o"
    else:
        (tmpfs / "filler").write_bytes(b"\0" * (1024 * 1024 - 8192))
        out = tmpfs / "o"
        out.mkdir()
    r = _cli(["segment", corpus.EXAMPLE, "--out", out, "--save", "flows", "-q"])
    assert r.exit_code == 1 and len(_errors(r)) == 1, r.output
    assert "No space left on device" in _errors(r)[0] and str(out) in _errors(r)[0]
    assert not out.exists() or [p.name for p in out.iterdir()] == []
    _extra("disk full (a 1 MiB tmpfs)", "exit 1: `cannot write o/nuclei_masks.tif (No space "
           "left on device)`; nothing left in o/")


def test_read_only_output_folder(tmpfs, tmp_path, monkeypatch):
    if tmpfs is None:
        import tempfile as tf

        def ro(*a, **k):
            raise OSError(30, "Read-only file system", k.get("dir"))

        monkeypatch.setattr(tf, "mkstemp", ro)
        out = tmp_path / "o"
        out.mkdir()
    else:
        out = tmpfs / "o"
        out.mkdir()
        (out / "earlier_masks.tif").write_bytes(b"earlier")
        subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    before = _snapshot(out)
    r = _cli(["segment", corpus.EXAMPLE, "--out", out, "-q"])
    assert r.exit_code == 1 and len(_errors(r)) == 1, r.output
    assert "Read-only file system" in _errors(r)[0] and str(out) in _errors(r)[0]
    assert _snapshot(out) == before
    _extra("read-only output folder", "exit 1: `cannot write o (Read-only file system)`; "
           "earlier results untouched")


# -- plugins -----------------------------------------------------------------------------------
class _WrongReconstructor:
    """A plugin whose reconstructor returns floats of the wrong shape."""

    from cellplug import hookimpl

    @staticmethod
    @hookimpl
    def register_mask_reconstructors(register):
        register("wrong-shape", lambda flows, cellprob, **kw: np.zeros((3, 3), np.float32))


def test_plugin_hook_returning_the_wrong_type(tmp_path):
    from cellplug.plugins import load_plugins
    from cellplug.segmenter import Segmenter, SegmentOptions

    registry = load_plugins()
    registry.add_module(_WrongReconstructor, "wrong")
    seg = Segmenter.from_model("generalist", registry=registry, reconstructor="wrong-shape")
    with pytest.raises(CellplugError, match=r"reconstructor .* broke its contract: returned "
                       r"float32 \(3, 3\), expected integer labels of shape \(360, 360\)"):
        seg.segment(tifffile.imread(corpus.EXAMPLE), SegmentOptions(diameter=17, tile=False))
    _extra("a reconstructor plugin returning the wrong type", "CellplugError: `reconstructor "
           "'<lambda>' broke its contract: returned float32 (3, 3), expected integer labels ...`")


def test_plugin_raising_at_import_is_reported_not_fatal(tmp_path):
    r = _cli(["segment", corpus.EXAMPLE, "--out", tmp_path / "o", "-q"])
    assert r.exit_code == 0
    assert ("warning: cellplug plugin 'broken' (cellplug_broken.plugin) skipped: import failed: "
            "ModuleNotFoundError") in r.stderr, "the broken test plugin is not installed"
    _extra("a plugin that raises at import", "exit 0; `warning: cellplug plugin 'broken' "
           "(cellplug_broken.plugin) skipped: import failed: ModuleNotFoundError: ...`")
