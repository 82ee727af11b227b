"""Write the example pipeline ``segment_nuclei.cppipe`` (run with CellProfiler's Python).

Images -> Metadata -> NamesAndTypes (every image is "DNA") -> Groups -> RunCellplug (objects
"Nuclei", the bundled generalist model, diameter estimated) -> MeasureObjectSizeShape ->
ExportToSpreadsheet (one CSV per object table into the Default Output Folder).

    python bridges/cellprofiler/examples/make_example.py [OUT.cppipe] [--plugins-directory DIR]

The RunCellplug module must be loadable: pass the plugins folder that install-plugin wrote
(default: a temporary one). The saved file is what the headless test runs (tests/test_headless.py)
and what docs/cellprofiler.md shows.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_pipeline(plugins_directory: str | None = None, **run_cellplug_settings):
    """The example pipeline, with RunCellplug settings overridden by keyword (setting attribute
    name -> value). Loads CellProfiler's modules (with the plugins folder) if needed."""
    import cellprofiler_core.preferences as prefs

    prefs.set_headless()
    if plugins_directory is None:
        from cellplug_cellprofiler.plugin import install_plugin

        plugins_directory = tempfile.mkdtemp(prefix="cellplug-cp-plugins-")
        install_plugin(Path(plugins_directory))
    prefs.set_plugin_directory(str(plugins_directory), globally=False)
    import cellprofiler_core.modules  # noqa: F401 - fills the modules and loads the plugins
    from cellprofiler_core.pipeline import Pipeline
    from cellprofiler_core.utilities.core.modules import instantiate_module

    pipeline = Pipeline()
    pipeline.init_modules()
    nat = pipeline.modules()[2]
    nat.assignment_method.value = "All images"
    nat.single_image_provider.value = "DNA"
    nat.single_load_as_choice.value = "Grayscale image"

    run = instantiate_module("RunCellplug")
    run.x_name.value = "DNA"
    run.y_name.value = "Nuclei"
    for name, value in run_cellplug_settings.items():
        getattr(run, name).value = value
    measure = instantiate_module("MeasureObjectSizeShape")
    measure.objects_list.value = "Nuclei"
    measure.calculate_zernikes.value = False
    export = instantiate_module("ExportToSpreadsheet")
    export.wants_overwrite_without_warning.value = True
    for i, module in enumerate((run, measure, export), start=len(pipeline.modules()) + 1):
        module.set_module_num(i)
        pipeline.add_module(module)
    return pipeline


def save(pipeline, path: Path) -> None:
    with open(path, "w") as fh:
        pipeline.dump(fh, save_image_plane_details=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=HERE / "segment_nuclei.cppipe")
    ap.add_argument("--plugins-directory", default=None)
    args = ap.parse_args()
    save(build_pipeline(args.plugins_directory), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
