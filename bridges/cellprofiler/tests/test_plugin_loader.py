"""The one-file plugin through CellProfiler's plugin loader (test 2 of issue 19), and the
`cellplug cellprofiler install-plugin / uninstall-plugin` commands."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import tifffile
from conftest import NUCLEI, cellplug_cli, make_module, run_module

LOAD_AND_RUN = textwrap.dedent("""
    import json, sys
    plugins, cppipe, image, out, block = sys.argv[1:6]
    if block == "block":  # the package missing from CellProfiler's Python
        sys.modules["cellplug_cellprofiler.module"] = None
    import cellprofiler_core.preferences as prefs
    prefs.set_headless()
    prefs.set_plugin_directory(plugins, globally=False)
    prefs.set_default_output_directory(out)
    import cellprofiler_core.modules  # fills the modules and loads the plugins, once
    from cellprofiler_core.reader import fill_readers, filter_active_readers
    from cellprofiler_core.utilities.core.plugins import PLUGIN_STATUS
    status = PLUGIN_STATUS.get("runcellplug")
    if block == "block":
        print(json.dumps({"status": status}))
        sys.exit(0)
    fill_readers(check_config=False)
    filter_active_readers(["imageio_reader"])
    from cellprofiler_core.pipeline import Pipeline
    from cellprofiler_core.utilities.pathname import pathname2url
    pipeline = Pipeline()
    pipeline.load(cppipe)
    (module,) = [m for m in pipeline.modules() if m.module_name == "RunCellplug"]
    pipeline.add_urls([pathname2url(image)])
    m = pipeline.run()
    print(json.dumps({
        "status": status, "class_module": type(module).__module__,
        "is_plugin": getattr(type(module), "is_plugin", False),
        "settings": [s.unicode_value for s in module.settings()],
        "count": int(m.get_measurement("Image", "Count_Nuclei", 1)),
        "x": m.get_measurement("Nuclei", "Location_Center_X", 1).tolist(),
        "area": m.get_measurement("Nuclei", "AreaShape_Area", 1).tolist(),
        "error": int(m.get_measurement("Image", "ModuleError_05RunCellplug", 1)),
    }))
""")

SETTINGS = {"diameter": 40.0, "min_size": 60, "remove_edge_masks": True, "flow_threshold": 0.6}


def _run_script(*args):
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_saved_pipeline_reloads_through_plugin_loader_and_runs(plugins_dir, tmp_path):
    import sys as _sys

    _sys.path.insert(0, str(NUCLEI.parents[1] / "bridges" / "cellprofiler" / "examples"))
    from make_example import build_pipeline, save

    pipeline = build_pipeline(str(plugins_dir), **SETTINGS)
    cppipe = tmp_path / "p.cppipe"
    save(pipeline, cppipe)
    (saved,) = [m for m in pipeline.modules() if m.module_name == "RunCellplug"]
    out = tmp_path / "out"
    out.mkdir()
    got = _run_script(plugins_dir, cppipe, NUCLEI, out, "-")
    assert got["status"]["loaded"] and got["status"]["error"] is None
    assert got["class_module"] == "runcellplug" and got["is_plugin"]
    assert got["settings"] == [s.unicode_value for s in saved.settings()]
    assert got["error"] == 0
    # the same objects as the module run here with the same settings
    ws = run_module(make_module(**SETTINGS), {"DNA": tifffile.imread(NUCLEI)})
    labels = ws.object_set.get_objects("Cells").segmented
    assert got["count"] == labels.max() > 0
    m = ws.measurements
    assert np.allclose(got["x"], m.get_current_measurement("Cells", "Location_Center_X"))
    assert np.array_equal(got["area"], np.bincount(labels.ravel())[1:])


def test_plugin_without_the_package_reports_why(plugins_dir, tmp_path):
    got = _run_script(plugins_dir, "-", "-", tmp_path, "block")
    assert got["status"]["loaded"] is False
    assert "RunCellplug needs the package cellplug-cellprofiler" in got["status"]["error"]


def test_install_and_uninstall_commands(tmp_path):
    from cellplug_cellprofiler.plugin import plugin_source

    folder = tmp_path / "CellProfiler plugins"
    proc = cellplug_cli("cellprofiler", "install-plugin", folder)
    target = folder / "runcellplug.py"
    assert proc.stdout.startswith(f"installed: {target}")
    assert target.read_text() == plugin_source()
    assert cellplug_cli("cellprofiler", "install-plugin", folder).stdout.startswith("unchanged")
    target.write_text(plugin_source() + "\n# older\n")  # an older copy of ours is replaced
    assert cellplug_cli("cellprofiler", "install-plugin", folder).stdout.startswith("updated")
    assert target.read_text() == plugin_source()
    assert cellplug_cli("cellprofiler", "uninstall-plugin", folder).stdout.startswith("removed")
    assert not target.exists()
    proc = cellplug_cli("cellprofiler", "uninstall-plugin", folder)
    assert proc.stdout.startswith("not installed")
    # somebody else's runcellplug.py is neither replaced nor removed
    target.write_text("print('mine')\n")
    proc = cellplug_cli("cellprofiler", "install-plugin", folder, check=False)
    assert proc.returncode == 1 and "not written by cellplug-cellprofiler" in proc.stderr
    proc = cellplug_cli("cellprofiler", "uninstall-plugin", folder, check=False)
    assert proc.returncode == 1 and "left alone" in proc.stderr
    assert target.read_text() == "print('mine')\n"
    assert cellplug_cli("cellprofiler", "install-plugin", folder, "--force").returncode == 0
    assert target.read_text() == plugin_source()


def test_command_is_listed_by_cellplug():
    proc = cellplug_cli("plugins", "list", "--kind", "command", "--json")
    rows = json.loads(proc.stdout)
    assert {"kind": "command", "name": "cellprofiler", "distribution": "cellplug-cellprofiler"
            }.items() <= next(r for r in rows if r["name"] == "cellprofiler").items()
