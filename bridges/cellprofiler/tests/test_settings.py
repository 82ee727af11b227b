"""Settings: a stable saved order, a .cppipe round trip, the upgrade from revision 1, the
model list."""

from __future__ import annotations

import io

import pytest
from cellplug_cellprofiler.module import CUSTOM_MODEL, RunCellplug, model_choices
from conftest import make_module

SAVED_ORDER = [  # revision 2; changing this order needs a new revision and an upgrade step
    "Select the input image", "Name the output object", "Model", "Location of the model file",
    "Model file name", "Expected object diameter", "Supply a nuclei image as well?",
    "Select the nuclei image", "Invert images?", "Flow threshold",
    "Cell probability threshold", "Minimum size",
    "Remove objects that are touching the edge?", "Save probability image?",
    "Name the probability image", "Use GPU",
]
DEFAULTS = ["None", "Cells", "generalist", "Elsewhere...|", "model.pth", "0.0", "No", "None",
            "No", "0.4", "0.0", "15", "No", "No", "Probabilities", "No"]
CHANGED = {"y_name": "Nuclei", "diameter": 23.5, "supply_nuclei": True, "invert": True,
           "flow_threshold": 0.7, "cellprob_threshold": -1.5, "min_size": 40,
           "remove_edge_masks": True, "save_probabilities": True,
           "probabilities_name": "NucleiProb", "use_gpu": True}


def test_saved_order_and_defaults():
    module = RunCellplug()
    assert RunCellplug.variable_revision_number == 2
    assert [s.text for s in module.settings()] == SAVED_ORDER
    assert [s.unicode_value for s in module.settings()] == DEFAULTS
    assert RunCellplug.category == "Object Processing"
    from cellprofiler_core.module.image_segmentation import ImageSegmentation

    assert issubclass(RunCellplug, ImageSegmentation)


def _pipeline_text(module) -> str:
    from cellprofiler_core.pipeline import Pipeline

    pipeline = Pipeline()
    module.set_module_num(1)
    pipeline.add_module(module)
    buf = io.StringIO()
    pipeline.dump(buf, save_image_plane_details=False)
    return buf.getvalue()


def _load(text: str):
    from cellprofiler_core.pipeline import Pipeline

    pipeline = Pipeline()
    pipeline.loadtxt(io.StringIO(text), raise_on_error=True)
    (module,) = pipeline.modules()
    return module


def _changed_module():
    module = make_module(**CHANGED)
    module.nuclei_image.value = "DAPI"
    return module


def test_cppipe_round_trip():
    module = _changed_module()
    loaded = _load(_pipeline_text(module))
    assert loaded.module_name == "RunCellplug"
    assert [s.unicode_value for s in loaded.settings()] == [
        s.unicode_value for s in module.settings()]


def test_revision_1_is_upgraded():
    """Revision 1 had no "Invert images?"; such a pipeline loads with it off and every other
    setting where it was."""
    module = _changed_module()
    text = _pipeline_text(module)
    assert "variable_revision_number:2|" in text
    old = text.replace("variable_revision_number:2|", "variable_revision_number:1|")
    old = "\n".join(ln for ln in old.splitlines() if not ln.strip().startswith("Invert images?"))
    assert old != text and "Invert" not in old
    loaded = _load(old)
    expected = [s.unicode_value for s in module.settings()]
    expected[SAVED_ORDER.index("Invert images?")] = "No"
    assert [s.unicode_value for s in loaded.settings()] == expected
    values, revision = RunCellplug().upgrade_settings(["a"] * 15, 1, "RunCellplug")
    assert revision == 2 and len(values) == 16 and values[8] == "No"


def test_model_list_shows_installed_models():
    from cellplug.models import available_models

    choices = model_choices()
    assert choices[0] == "generalist" and choices[-1] == CUSTOM_MODEL
    assert set(choices[:-1]) == set(available_models())
    # a pipeline from a machine with another model keeps its choice (and says so on validation)
    module = make_module(model="their-model")
    module.model.test_valid(None)  # refreshes the list; does not refuse the saved value
    assert "their-model" in module.model.choices
    from cellprofiler_core.setting import ValidationError

    with pytest.raises(ValidationError, match="'their-model' is not installed"):
        module.validate_module(None)


def test_custom_model_validation(tmp_path):
    from cellprofiler_core.preferences import ABSOLUTE_FOLDER_NAME
    from cellprofiler_core.setting import ValidationError

    module = make_module(model=CUSTOM_MODEL)
    module.model_directory.value = f"{ABSOLUTE_FOLDER_NAME}|{tmp_path}"
    module.model_file_name.value = "mine.pth"
    assert module.model_directory in module.visible_settings()
    with pytest.raises(ValidationError, match="model file not found"):
        module.validate_module(None)
    (tmp_path / "mine.pth").write_bytes(b"x")
    module.validate_module(None)
    assert make_module().model_directory not in make_module().visible_settings()
