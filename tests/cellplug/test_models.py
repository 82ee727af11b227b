"""Model files: safe loading, clean errors for wrong files, Cellpose files and size models."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from cellplug.errors import CellplugError
from cellplug.models import (
    SizeModel,
    build_network,
    load_cellpose_size_model,
    load_state_dict,
    model_from_path,
    resolve_model,
    save_model,
)
from cellplug.plugins import get_registry


class _Payload:
    """An arbitrary object: a torch file holding it is not a plain state dict."""

    def __init__(self) -> None:
        self.x = 1


class _RunsCommand:
    """Unpickling this runs a shell command (a stand-in for a malicious file)."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _expect_error(path, *fragments):
    with pytest.raises(CellplugError) as info:
        build_network(model_from_path(path))
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    return message


# -- wrong files -----------------------------------------------------------------------------
def test_text_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    _expect_error(path, "not a model weights file", "expected a PyTorch state dict")


def test_numpy_files(tmp_path):
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3))
    _expect_error(npy, "not a model weights file")
    npz = tmp_path / "arrays.pth"  # a zip archive, like torch files, but not one
    with open(npz, "wb") as fh:
        np.savez(fh, a=np.zeros(3))
    _expect_error(npz, "cannot read model weights")


def test_torch_file_with_a_pickled_object(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"weight": torch.zeros(2), "extra": _Payload()}, path)
    _expect_error(path, "refused to load", "only plain state dicts are accepted")


def test_torch_file_whose_unpickling_runs_code_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": _RunsCommand(str(sentinel))}, path)
    _expect_error(path, "refused to load")
    assert not sentinel.exists()


def test_torch_file_that_is_not_a_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    _expect_error(path, "expected a state dict")


def test_state_dict_of_another_architecture(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    _expect_error(path, "do not match backbone 'cellpose-unet'", "expected a Cellpose 2/3 CPnet")


def test_cellpose_layout_with_missing_parameters(tmp_path, random_cellpose_file):
    state = load_state_dict(random_cellpose_file)
    del state["upsample.up.res_up_1.conv.conv_2.full.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    _expect_error(path, "do not fit backbone 'cellpose-unet'", "missing")


def test_missing_file(tmp_path):
    with pytest.raises(CellplugError, match="model file not found"):
        resolve_model(tmp_path / "nope.pth")
    with pytest.raises(CellplugError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")


# -- Cellpose files --------------------------------------------------------------------------
def test_bare_cellpose_file_loads_with_its_diameters(random_cellpose_file):
    info = resolve_model(random_cellpose_file)
    assert info.metadata["format"] == "cellpose" and info.size_model is None
    net = build_network(info)
    assert info.diam_mean == 30.0 and info.diam_labels == 30.0 and info.n_channels == 2
    assert not net.training


def _size_params(diam_mean=30.0):
    rng = np.random.default_rng(0)
    return {"A": rng.normal(0, 0.1, 256), "smean": rng.normal(0, 0.05, 256),
            "diam_mean": diam_mean, "ymean": np.float64(-0.2)}


def test_cellpose_file_with_size_model(tmp_path, random_cellpose_file):
    path = tmp_path / "cp_model"
    shutil.copy(random_cellpose_file, path)
    params = _size_params()
    np.save(str(path) + "_size.npy", params)  # what Cellpose's train_size writes
    info = resolve_model(path)
    sm = info.size_model
    assert isinstance(sm, SizeModel)
    np.testing.assert_allclose(sm.A, params["A"])
    assert sm.diam_mean == 30.0 and sm.ymean == pytest.approx(-0.2)
    style = np.random.default_rng(1).normal(0, 0.06, 256)
    expected = np.exp(params["A"] @ (style - params["smean"]) + np.log(30.0) + params["ymean"])
    assert sm.predict(style) == pytest.approx(max(5.0, expected))


def test_size_model_beside_a_pth_file(tmp_path, random_cellpose_file):
    path = tmp_path / "cp_model.pth"
    shutil.copy(random_cellpose_file, path)
    np.save(tmp_path / "cp_model_size.npy", _size_params(17.0))
    assert resolve_model(path).size_model.diam_mean == 17.0


def test_malicious_size_file_is_refused(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "cp_size.npy"
    np.save(path, np.array([_RunsCommand(str(sentinel))], dtype=object), allow_pickle=True)
    with pytest.raises(CellplugError, match=r"not a readable Cellpose size model .*not allowed"):
        load_cellpose_size_model(path)
    assert not sentinel.exists()


def test_size_file_of_the_wrong_kind(tmp_path):
    plain = tmp_path / "plain_size.npy"
    np.save(plain, np.zeros(4))
    with pytest.raises(CellplugError, match="expected a Cellpose size model"):
        load_cellpose_size_model(plain)
    partial = tmp_path / "partial_size.npy"
    np.save(partial, {"A": np.zeros(3)})
    with pytest.raises(CellplugError, match="size model lacks smean, ymean, diam_mean"):
        load_cellpose_size_model(partial)


# -- our own files ---------------------------------------------------------------------------
def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(2)
    net = get_registry().get("backbone", "cellpose-unet")(nbase=(8, 16, 32), diam_mean=17.0).eval()
    path = save_model(tmp_path / "tiny", net, {"name": "tiny", "diam_mean": 17.0,
                                               "diam_labels": 21.0, "backbone_options": {}})
    assert path.suffix == ".pth" and path.with_suffix(".json").exists()
    info = resolve_model(path)
    assert info.name == "tiny" and info.diam_labels == 21.0
    loaded = build_network(info)
    x = torch.rand(1, 2, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x)[0].numpy(), net(x)[0].numpy(), atol=1e-6)
    # half-precision files load back as float32
    half = save_model(tmp_path / "half.pth", net, {"name": "half"}, half=True)
    assert load_state_dict(half)["output.2.weight"].dtype == torch.float16
    assert next(build_network(resolve_model(half)).parameters()).dtype == torch.float32
    # the same weights give the same bytes (no temporary file name inside the archive)
    again = save_model(tmp_path / "again" / "half.pth", net, {"name": "half"}, half=True)
    assert again.read_bytes() == half.read_bytes()
