"""The plugin contract: one hook per kind of plugin.

Every hook receives a ``register`` callable and calls it once per thing it provides,
in the style of ``llm``'s ``register_models``. The plugin manager (:mod:`cellplug.plugins`)
collects the registrations, records which plugin and distribution provided each, and keeps
going when one plugin fails.

A plugin module implements any subset of these hooks with :data:`cellplug.hookimpl`::

    from cellplug import hookimpl

    @hookimpl
    def register_backbones(register):
        register("my-unet", build_my_unet)

Every implementation takes exactly one argument, ``register``. The plugin manager checks
this when it registers a plugin, together with the hook names (a misspelt hook is an
error, not a silently unused function); a plugin that gets either wrong is rejected and
reported, and the other plugins keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("cellplug")

Register = Callable[..., None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register neural-network backbones.

    Call ``register(name, factory)`` for each backbone. ``factory(n_channels, n_outputs,
    **options)`` returns a ``torch.nn.Module`` whose ``forward(x)`` maps

    - ``x``: float32 tensor (B, C, H, W), a normalised image batch, ``C == n_channels``,
      ``H`` and ``W`` multiples of 16,

    to a tuple ``(raw, style)``:

    - ``raw``: float32 tensor (B, n_outputs, H, W), interpreted by a flow decoder;
    - ``style``: float32 tensor (B, S), one L2-normalised style vector per image.

    The module may carry ``diam_mean`` and ``diam_labels`` (1-element tensors, pixels)
    in its state dict: the object diameter it was trained at, and the mean diameter of
    its training labels. ``factory.accepts_state_dict(state_dict) -> dict | None`` may be
    provided: it returns the factory options that rebuild the network for a given state
    dict (used to load weights that carry no metadata, such as Cellpose ``.pth`` files),
    or ``None`` when the state dict is not this backbone's.

    Two more optional attributes of ``factory`` declare a *runtime* backbone, one that runs
    other backbones' weights with another engine (``cellplug-openvino``):

    - ``factory.inference_only = True``: the module cannot be trained. ``cellplug train
      --backbone NAME`` then trains the torch backbone named by the factory's ``base``
      option (or refuses when there is none); the saved model names that backbone.
    - ``factory.runs``: the backbones whose weights it runs, a tuple of names or ``"*"``
      (any backbone that is not itself a runtime one). The factory takes the keyword option
      ``base`` (the backbone whose weights it runs, passed by ``segment --backbone NAME``)
      and returns a module with ``base``'s state-dict layout, so the weights load
      unchanged; its other keyword-only parameters are run-time options
      (``--backbone-option``), the rest go to ``base``'s factory. ``cellplug plugins list``
      shows which models each backbone runs.

    A runtime backbone may also skip torch altogether once it has seen a weights file:

    - ``factory.load_cached(weights, options) -> (module, facts) | None``: build the module
      for the weights file ``weights`` (a path) and the factory ``options`` from the
      backbone's own cache, without loading the weights with torch; ``None`` when the cache
      cannot (the core then loads them with torch and calls the factory). ``facts`` are what
      the core would have read from the weights: ``n_channels``, and ``diam_mean`` /
      ``diam_labels`` where the state dict holds them.
    - ``module.remember_weights_file(weights, options, facts)``: called on a module the
      factory built, after the core loaded ``weights`` into it, so that the backbone can
      record the facts for ``load_cached``.
    - An *array module* (``module.takes_arrays = True``) is called as ``module(x,
      precision)`` with ``x`` a float32 numpy array (B, C, H, W) and ``precision``
      ``"fp32"`` or ``"bf16"``, and returns numpy ``(raw, style)`` as above; the core then
      never imports torch for it. It may carry ``nbase`` (its feature widths) and
      ``batch_size`` (the images it wants per call, when that is more than the segmenter's
      batch size: an engine that waits for all its streams at the end of each call loses
      less in bigger calls), and gets a ``threads`` attribute from the segmenter.

    The kit :mod:`cellplug.testing` checks these contracts for a plugin's backbone.
    """


@hookspec
def register_flow_decoders(register: Register) -> None:
    """Register flow representations (decoders).

    Call ``register(name, decoder)``. A decoder defines what the backbone learns and how
    its output becomes flows. It has:

    - ``n_outputs: int``: the number of raw output channels K it needs;
    - ``targets(labels) -> ndarray``: training targets from a label image
      (H, W) integer, 0 = background, returned as float32 (T, H, W);
    - ``decode(raw) -> (flows, cellprob)``: raw float32 (K, H, W) to a flow field
      float32 (2, H, W) (Y then X, unit scale, pointing towards object centres) and a
      cell-probability map float32 (H, W) (a logit: > 0 means "inside a cell");
    - ``loss(raw, targets) -> torch scalar``: raw (B, K, H, W) and targets (B, T, H, W)
      as torch tensors, used for training;
    - ``vector_channels: tuple[int, int]`` (optional): the target channels holding the
      (Y, X) components of a vector field; augmentation rotates and mirrors them with the
      image, and their raw counterparts (index - 1) change sign when tiles are mirrored;
    - ``target_interpolation: tuple[str, ...]`` (optional): ``"nearest"`` or ``"linear"``
      per target channel, used when targets are warped (default: all linear).
    """


@hookspec
def register_mask_reconstructors(register: Register) -> None:
    """Register mask reconstructors.

    Call ``register(name, reconstruct)`` with
    ``reconstruct(flows, cellprob, **params) -> labels``:

    - ``flows``: float32 (2, H, W), unit-scale flow field from a decoder;
    - ``cellprob``: float32 (H, W), cell-probability logit;
    - ``params``: keyword parameters (``niter``, ``cellprob_threshold``, ``flow_threshold``,
      ``min_size``, ``interp``, ...); a reconstructor must accept and ignore ones it does not
      use. ``interp=False`` is passed by the size model's second pass: Cellpose steps there
      with the flow of the pixel a position lies in instead of interpolating it;
    - ``labels``: uint32 (H, W), 0 = background, objects numbered 1..N.

    Optional: ``reconstruct.warm_up()``, with no arguments, prepares what the first call
    would otherwise pay for (the bundled one imports numba and loads its compiled code, about
    half a second). The segmenter runs it once, in a background thread, while its first
    network pass runs, and waits for it before the first reconstruction; an exception there
    is ignored.
    """


@hookspec
def register_style_selectors(register: Register) -> None:
    """Register style selectors (``--model auto``).

    Call ``register(name, select)`` with ``select(styles, models) -> list[str]``:

    - ``styles``: float32 (N, S), one style vector per image, computed by a common
      reference model;
    - ``models``: sequence of :class:`cellplug.models.ModelInfo` candidates, each possibly
      carrying a ``style_centroid`` (S,) in its metadata;
    - returns one model name per image.
    """


@hookspec
def register_annotation_sources(register: Register) -> None:
    """Register annotation sources (training and correction data).

    Call ``register(name, source)``. A source has:

    - ``detect(location: pathlib.Path) -> bool``: whether it can read ``location``;
    - ``read(location) -> Iterator[Annotation]``: yields
      :class:`cellplug.annotations.Annotation` items, each an image (Y, X) or (Y, X, C)
      in its own dtype and a label image (Y, X) integer with 0 = background, plus the
      stem they came from. A bad item raises :class:`cellplug.errors.CellplugError` naming
      its file;
    - optionally ``read(location, on_error=None)``: when ``on_error`` is given, call it with
      that error for each bad item and go on with the next (``train --on-error skip``);
    - optionally ``why_not(location) -> str | None``: when ``detect`` is False, a short reason
      (e.g. the label files that are missing), added to the "no source can read this" error.
    - optionally ``configured(**options) -> source``: a copy with options set (strings from
      ``train --source NAME --source-option KEY=VALUE``); a TypeError names a bad option.
    """


@hookspec
def register_models(register: Register) -> None:
    """Register pretrained models shipped by a plugin.

    Call ``register(name, weights_path)`` where ``weights_path`` is a
    :class:`pathlib.Path` to a state-dict file (``.pth``, loadable with
    ``torch.load(weights_only=True)``). Metadata is read from the JSON file beside it
    (same stem, ``.json``); see :mod:`cellplug.models`.
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register subcommands of the ``cellplug`` command line (bridges use this).

    Call ``register(name, command)`` with a :class:`click.Command` (or group); it runs as
    ``cellplug <name> ...``. A name that is already a built-in command is refused. Commands
    are looked up only when the command line needs them, so plugins are not imported for
    ``cellplug segment``.
    """


HOOK_KINDS: dict[str, str] = {
    "backbone": "register_backbones",
    "decoder": "register_flow_decoders",
    "reconstructor": "register_mask_reconstructors",
    "selector": "register_style_selectors",
    "source": "register_annotation_sources",
    "model": "register_models",
    "command": "register_commands",
}
"""Plugin kinds as the CLI names them, mapped to the hook that registers them."""


def _all_specs() -> dict[str, Any]:
    return {name: globals()[name] for name in HOOK_KINDS.values()}
