"""The dock widget in a real napari viewer: segment, re-run thresholds, correct, train, save,
cancel. Segmentation runs in napari's worker threads, as for a user; tests wait for them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from conftest import REPO, wait_idle
from skimage.segmentation import relabel_sequential

from cellplug.annotations import read_annotations
from cellplug.cli import main
from cellplug.io import read_image
from cellplug.segmenter import Segmenter

NAMES = ["dsb2018_bf.tif", "dsb2018_fluo.tif", "usiigaci_phc.tif"]  # crops_folder, sorted


def _segmented(qtbot, widget, folder):
    widget.open_folder(folder)
    widget.segment()
    wait_idle(qtbot, widget)
    assert widget.item.segmentation is not None, widget.status.text()
    return widget.item


def test_segments_like_the_command_line(qtbot, widget, nuclei_folder, tmp_path):
    item = _segmented(qtbot, widget, nuclei_folder)
    r = CliRunner().invoke(main, ["segment", str(nuclei_folder / "nuclei.tif"), "--out",
                                  str(tmp_path / "cli"), "-q"])
    assert r.exit_code == 0, r.output
    cli = tifffile.imread(tmp_path / "cli" / "nuclei_masks.tif")
    layer = widget.labels_layer
    assert layer in widget.viewer.layers and layer.data.shape == (360, 360)
    np.testing.assert_array_equal(layer.data, cli)
    assert int(cli.max()) > 10
    # the widget shows which model segmented and why, and the diameter it used, as a circle
    assert item.model == "generalist" and widget.model_combo.currentText() == "generalist"
    assert "segmented by generalist (picked in the model list)" in widget.model_label.text()
    assert widget.diameter_layer.metadata["diameter"] == pytest.approx(item.segmentation.diameter)
    assert widget.diameter_layer.shape_type == ["ellipse"]
    assert not item.corrected
    # the optional flow and cell probability layers
    widget.show_maps.setChecked(True)
    assert widget.flows_layer.data.shape == (360, 360, 3) and widget.flows_layer.rgb
    assert widget.prob_layer.data.shape == (360, 360)
    layers = list(widget.viewer.layers)
    assert layers.index(widget.labels_layer) > layers.index(widget.flows_layer)
    widget.show_maps.setChecked(False)
    assert widget.flows_layer is None and "cellplug flows" not in widget.viewer.layers


def test_estimate_draws_the_diameter(qtbot, widget, nuclei_folder):
    widget.open_folder(nuclei_folder)
    widget.estimate_diameter()
    wait_idle(qtbot, widget)
    expected = Segmenter.from_model("generalist").estimate_diameter(
        read_image(nuclei_folder / "nuclei.tif"))
    assert widget.diameter.value() == pytest.approx(expected, abs=0.05)
    assert widget.diameter_layer.metadata["diameter"] == pytest.approx(expected, abs=0.05)
    widget.diameter.setValue(30.0)  # typing a diameter redraws the circle
    ellipse = widget.diameter_layer.data[0]
    assert np.ptp(ellipse[:, 0]) == pytest.approx(30.0)


def test_a_threshold_change_reruns_only_the_reconstruction(qtbot, widget, nuclei_folder,
                                                           monkeypatch):
    item = _segmented(qtbot, widget, nuclei_folder)
    before = item.labels.copy()
    calls = {"network": 0, "remask": 0}
    network, remask = Segmenter.network, Segmenter.remask

    def count_network(self, *args, **kwargs):
        calls["network"] += 1
        return network(self, *args, **kwargs)

    def count_remask(self, *args, **kwargs):
        calls["remask"] += 1
        return remask(self, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "network", count_network)
    monkeypatch.setattr(Segmenter, "remask", count_remask)
    flows = item.segmentation.flows
    widget.cellprob_threshold.setValue(-3.0)
    qtbot.waitUntil(lambda: widget.worker is not None or calls["remask"], timeout=5000)
    wait_idle(qtbot, widget)
    assert calls == {"network": 0, "remask": 1}
    assert item.segmentation.flows is flows  # the same network output
    assert "with the new thresholds (masks only" in widget.status.text()
    assert (item.labels > 0).sum() > (before > 0).sum()
    np.testing.assert_array_equal(widget.labels_layer.data, item.labels)
    # what a full segmentation with that threshold gives
    full = widget.models.segmenter("generalist").segment(  # at the diameter used before
        read_image(nuclei_folder / "nuclei.tif"), widget.options(),
        diameter=item.segmentation.diameter)
    np.testing.assert_array_equal(item.labels, full.labels)


def test_delete_merge_and_paint_are_corrections(qtbot, widget, nuclei_folder):
    item = _segmented(qtbot, widget, nuclei_folder)
    layer = widget.labels_layer
    viewer = widget.viewer
    keys = {str(k).split(": ")[-1].rstrip(">"): f for k, f in viewer.keymap.items()}
    assert {"Shift+D", "Shift+M"} <= set(keys)
    labels = layer.data
    ids = [int(i) for i in np.unique(labels) if i]
    n = len(ids)

    def centre(label):
        ys, xs = np.nonzero(layer.data == label)
        k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        return (float(ys[k]), float(xs[k]))

    # delete: the key binding, with the cursor over an object
    viewer.cursor.position = centre(ids[0])
    assert widget.object_under_cursor() == ids[0]
    keys["Shift+D"](viewer)
    assert not (layer.data == ids[0]).any() and item.corrected
    qtbot.waitUntil(lambda: "✎ corrected" in widget.image_label.text(), timeout=2000)
    layer.undo()  # napari's own undo brings it back
    assert (layer.data == ids[0]).any()
    widget.delete_object(ids[0])
    # merge: Shift-M over one object, then over another
    a, b = ids[1], ids[2]
    area = int((layer.data == a).sum() + (layer.data == b).sum())
    viewer.cursor.position = centre(a)
    widget._merge_key(viewer)
    assert "marked" in widget.status.text()
    viewer.cursor.position = centre(b)
    widget._merge_key(viewer)
    assert not (layer.data == b).any() and int((layer.data == a).sum()) == area
    # paint a new object with napari's brush
    new = int(layer.data.max()) + 1
    layer.brush_size = 9
    layer.paint((5, 5), new)
    assert (layer.data == new).sum() > 20
    assert len(np.unique(layer.data[layer.data > 0])) == n - 2 + 1
    qtbot.waitUntil(lambda: f"{n - 1} objects" in widget.model_label.text(), timeout=2000)
    assert item.labels is layer.data or np.array_equal(item.labels, layer.data)
    assert widget.corrected_label.text() == "corrected: 1 of 1 image(s)"
    assert widget.image_label.text() == "1 / 1: nuclei.tif ✎ corrected"


def test_train_on_corrections_adds_selects_and_resegments(qtbot, widget, crops_folder, zoo):
    widget.open_folder(crops_folder)
    widget.segment_all()
    wait_idle(qtbot, widget)
    assert all(i.segmentation is not None for i in widget.items), widget.status.text()
    first = widget.items[0]
    widget.delete_object(int(first.labels.max()))  # a correction of the first image
    corrected = first.labels.copy()
    assert first.corrected and not widget.items[1].corrected
    widget.epochs.setValue(2)
    widget.train()
    assert widget.job == "training"
    wait_idle(qtbot, widget, timeout=600)
    name = widget.trained_model
    assert name == "generalist-napari-1", widget.status.text()
    assert (zoo / f"{name}.pth").is_file()
    meta = json.loads((zoo / f"{name}.json").read_text())
    assert meta["base_model"] == "generalist"
    assert meta["training"]["data"]["source_format"] == "napari"
    assert [i["stem"] for i in meta["training"]["data"]["images"]] == ["dsb2018_bf"]
    assert len(meta["training"]["history"]) == 2
    # in the picker, selected, and the images not corrected were segmented with it
    assert widget.model_combo.currentText() == name
    assert name in [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    for other in widget.items[1:]:
        assert other.model == name and other.segmentation.n_objects > 0
    np.testing.assert_array_equal(first.labels, corrected)  # the correction stays
    assert first.model == "generalist"


def test_training_can_be_cancelled(qtbot, widget, crops_folder, zoo):
    _segmented(qtbot, widget, crops_folder)
    widget.delete_object(1)
    widget.epochs.setValue(200)
    widget.train()
    # the trainer's first report: its time estimate, made before the first step
    qtbot.waitUntil(lambda: "training: 200 epochs" in widget.status.text(), timeout=300_000)
    assert widget.progress.maximum() == 200
    widget.cancel()
    wait_idle(qtbot, widget)
    assert widget.status.text() == "training cancelled"
    assert not zoo.exists() or not list(zoo.iterdir())
    assert widget.train_button.isEnabled() and not widget.cancel_button.isEnabled()


@pytest.mark.filterwarnings("ignore:.*have no _masks file:UserWarning")  # the others
def test_saved_corrections_read_back_through_the_annotation_sources(qtbot, widget,
                                                                   crops_folder):
    widget.open_folder(crops_folder)
    widget.segment()
    wait_idle(qtbot, widget)
    item = widget.items[0]
    widget.delete_object(2)  # leaves a gap in the ids: saved renumbered 1..N
    for check in widget.save_kinds.values():
        check.setChecked(True)
    written = widget.save()
    assert sorted(p.name for p in written) == ["dsb2018_bf_RoiSet.zip", "dsb2018_bf_masks.tif",
                                               "dsb2018_bf_seg.npy"]
    expected = relabel_sequential(item.labels)[0]
    for source in ("mask-folder", "imagej-roi", "cellpose-seg-npy"):
        found = {a.stem: a for a in read_annotations(crops_folder, source)}
        assert list(found) == ["dsb2018_bf"], source
        np.testing.assert_array_equal(found["dsb2018_bf"].labels, expected, err_msg=source)
        np.testing.assert_array_equal(found["dsb2018_bf"].image, item.image)
    # the folder lists the images only, not the saved outputs
    widget.open_folder(crops_folder)
    assert [i.name for i in widget.items] == NAMES


def test_nothing_to_save_or_train_without_corrections(qtbot, widget, crops_folder):
    widget.open_folder(crops_folder)
    assert widget.save() == [] and "no corrected image" in widget.status.text()
    widget.train()
    assert widget.worker is None and "no corrected image yet" in widget.status.text()


def test_a_running_segmentation_can_be_cancelled(qtbot, widget, crops_folder):
    widget.open_folder(crops_folder)
    widget.segment_all()
    qtbot.waitUntil(lambda: widget.status.text().startswith("segmenting 1/3"), timeout=10_000)
    assert widget.cancel_button.isEnabled() and not widget.segment_button.isEnabled()
    widget.cancel()
    wait_idle(qtbot, widget)
    assert widget.status.text() == "segmentation cancelled"
    assert all(i.segmentation is None for i in widget.items)  # the running one is dropped
    assert not widget.labels_layer.data.any()
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_folder_navigation_keeps_each_images_labels(qtbot, widget, crops_folder):
    widget.open_folder(crops_folder)
    assert widget.image_label.text() == f"1 / 3: {NAMES[0]}" and not widget.prev_button.isEnabled()
    widget.segment()
    wait_idle(qtbot, widget)
    first = widget.labels_layer.data.copy()
    widget.go(+1)
    assert widget.image_layer.name == NAMES[1] and not widget.labels_layer.data.any()
    np.testing.assert_array_equal(widget.image_layer.data, read_image(crops_folder / NAMES[1]))
    widget.go(+1)
    widget.go(+1)  # stays at the last
    assert widget.index == 2 and not widget.next_button.isEnabled()
    widget.go(-2)
    np.testing.assert_array_equal(widget.labels_layer.data, first)


def test_without_a_folder_it_segments_the_selected_image_layer(qtbot, widget):
    viewer = widget.viewer
    viewer.open_sample("cellplug-napari", "nuclei")
    widget.segment()
    wait_idle(qtbot, widget)
    assert widget.items[0].name == "nuclei" and widget.image_layer.name == "nuclei"
    assert [la.name for la in viewer.layers if la.as_layer_data_tuple()[2] == "image"] == \
        ["nuclei"]  # no copy of the image was added
    assert widget.labels_layer.data.max() > 10


def test_auto_shows_which_model_it_chose_and_why(qtbot, widget, crops_folder, zoo):
    """With a zoo for the default model, the picker offers auto (cellplug.selection)."""
    from cellplug.models import user_model_dir
    from cellplug.segmenter import SegmentOptions

    assert "auto" not in [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    bundled = REPO / "plugins/cellplug_zoo/weights/generalist.pth"
    ref = Segmenter.from_model("generalist")
    image = read_image(crops_folder / NAMES[1])
    style = ref.default_scale_style(ref.prepare(image, SegmentOptions()), SegmentOptions())
    folder = user_model_dir()
    folder.mkdir(parents=True)
    shutil.copy(bundled, folder / "fluo-like.pth")
    meta = json.loads(bundled.with_suffix(".json").read_text())
    meta.update(name="fluo-like", style_centroid=[float(v) for v in style],
                zoo={"reference": "generalist", "cluster": 1, "min_similarity": 0.5})
    (folder / "fluo-like.json").write_text(json.dumps(meta))
    widget.refresh_models()
    assert widget.model_combo.itemText(0) == "auto"
    widget.model_combo.setCurrentText("auto")
    widget.open_folder(crops_folder)
    widget.go(+1)
    widget.segment()
    wait_idle(qtbot, widget)
    item = widget.item
    assert item.model == "fluo-like", widget.status.text()
    assert "segmented by fluo-like (auto: nearest-centroid: similarity 1.000" in \
        widget.model_label.text()
    widget.flow_threshold.setValue(0.8)  # thresholds re-run with the chosen model
    wait_idle(qtbot, widget)
    assert "with the new thresholds" in widget.status.text() and item.model == "fluo-like"
