"""Composition of the chosen plugins: image -> labels. No file I/O here.

A :class:`Segmenter` holds a model's network, its flow decoder and a mask reconstructor,
and runs the steps in order, each a plain function:

    select channels -> normalise -> rescale to ``diam_mean`` -> network (tiled or whole)
    -> resample back -> decode to flows + cell probability -> reconstruct labels
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import transforms
from .errors import CellplugError
from .inference import run_network
from .models import ModelInfo, build_network, resolve_model, with_backbone
from .plugins import PluginRegistry, get_registry


@dataclass
class SegmentOptions:
    """Everything that changes a segmentation, with Cellpose's defaults (and bfloat16).

    diameter
        Typical object diameter in pixels; ``0`` or ``None`` estimates it with the model's
        size model (or, without one, uses the model's mean training diameter ``diam_labels``).
    channels
        ``(cyto, nucleus)``, 0 = grayscale / none, 1-based otherwise.
    tile
        ``True`` (default): Cellpose's 224 px tiles. ``False``: one whole-image network pass
        (~1.7x less work, but one style vector for the whole image instead of one per tile,
        so masks can differ); ``"auto"``: whole-image when it fits in memory, else tiles;
        ``"grid"``: tiles on a grid fixed to the image's origin (:mod:`cellplug.aligned`), so
        a pixel's result does not depend on the image's size or crop: what block-wise
        segmentation computes.
    precision
        ``"auto"`` (default): bfloat16 autocast on CPUs with native bfloat16 (1.5-2x faster
        network, masks AP@0.5 ~0.99 against float32), else float32. ``tile=True`` with
        ``precision="fp32"`` is the Cellpose-identical mode.
    resample
        Resample network outputs to the original size before the mask step (Cellpose's
        default); ``False`` computes masks at the rescaled size and resizes the labels.
    niter
        Dynamics steps; ``None``: 200 / rescale when resampling, else 200 (as Cellpose).
    """

    diameter: float | None = 0.0
    channels: Sequence[int] = (0, 0)
    invert: bool = False
    percentiles: tuple[float, float] = (1.0, 99.0)
    tile: bool | str = True
    bsize: int = 224
    tile_overlap: float = 0.1
    batch_size: int = 8
    augment: bool = False
    precision: str = "auto"
    resample: bool = True
    niter: int | None = None
    cellprob_threshold: float = 0.0
    flow_threshold: float = 0.4
    min_size: int = 15
    max_size_fraction: float = 0.4


@dataclass
class Segmentation:
    """What :meth:`Segmenter.segment` returns.

    labels: uint32 (Y, X), 0 = background, objects 1..N; flows: float32 (2, Y, X) unit
    scale (Y then X); cellprob: float32 (Y, X) logit; style: float32 (S,) L2-normalised;
    diameter: the diameter used (pixels); timings: seconds per step ("prepare", "size",
    "network", "masks", "total"); n_tiles: network passes of the final run (1 = whole image);
    resampled: whether flows and cellprob are at the image's size (``resample=True``) or at
    the network's rescaled size. Flows and cellprob are the network output that
    :meth:`Segmenter.remask` turns into labels again with other thresholds.
    """

    labels: np.ndarray
    flows: np.ndarray
    cellprob: np.ndarray
    style: np.ndarray
    diameter: float
    timings: dict[str, float] = field(default_factory=dict)
    n_tiles: int = 0
    resampled: bool = True

    @property
    def n_objects(self) -> int:
        return int(self.labels.max()) if self.labels.size else 0


def _count_objects(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels.ravel())[1:]
    return counts[counts > 0]


def remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects of fewer than ``min_size`` pixels from (Y, X) labels and renumber 1..N."""
    if min_size <= 0 or labels.size == 0:
        return labels
    counts = np.bincount(labels.ravel())
    keep = counts >= min_size
    keep[0] = False
    lut = np.zeros(counts.size, labels.dtype)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    return lut[labels]


def median_diameter(labels: np.ndarray) -> float:
    """Median object diameter (diameter of the disk of the same area), 0 if none."""
    counts = _count_objects(labels)
    if counts.size == 0:
        return 0.0
    return float(np.median(np.sqrt(counts)) / (np.sqrt(np.pi) / 2))


class Segmenter:
    """A model's network plus the decoder and reconstructor that turn its output into labels."""

    def __init__(
        self,
        model: ModelInfo,
        net: Any,
        decoder: Any,
        reconstructor: Any,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.net = net
        self.decoder = decoder
        self.reconstructor = reconstructor
        self.threads = threads
        self._warm_up: threading.Thread | None = None  # see start_warm_up
        self._warm_up_lock = threading.Lock()  # block-wise runs share one segmenter
        # the plugins by name, as recorded in summary.json (from_info sets the reconstructor's)
        self.plugin_names: dict[str, Any] = {
            "backbone": model.backbone,
            "backbone_options": dict(model.metadata.get("backbone_options") or {}),
            "decoder": model.decoder,
            "reconstructor": model.reconstructor,
        }
        self.vector_channels = tuple(
            c - 1 for c in getattr(decoder, "vector_channels", (1, 2))
        )  # raw channels are targets minus the foreground channel
        # an array backbone (numpy in and out) runs without torch: so does everything here
        self.torch_free = bool(getattr(self.net, "takes_arrays", False))
        if not self.torch_free:
            import torch

            self.net = self.net.to(memory_format=torch.channels_last)

    @classmethod
    def from_model(
        cls,
        ref: str | None = None,
        registry: PluginRegistry | None = None,
        reconstructor: str | None = None,
        threads: int | None = None,
        backbone: str | None = None,
        backbone_options: dict[str, Any] | None = None,
    ) -> Segmenter:
        """Build from a model name or path (``None``: the default model)."""
        registry = registry or get_registry()
        return cls.from_info(resolve_model(ref, registry), registry, reconstructor, threads,
                             backbone, backbone_options)

    @classmethod
    def from_info(
        cls,
        info: ModelInfo,
        registry: PluginRegistry | None = None,
        reconstructor: str | None = None,
        threads: int | None = None,
        backbone: str | None = None,
        backbone_options: dict[str, Any] | None = None,
    ) -> Segmenter:
        """Build from a resolved :class:`ModelInfo`.

        ``reconstructor``, ``backbone`` and ``backbone_options`` override the model's
        metadata (see :func:`cellplug.models.with_backbone`); the names used are in
        :attr:`plugin_names`.
        """
        registry = registry or get_registry()
        info = with_backbone(info, backbone, backbone_options, registry)
        net = build_network(info, registry)
        decoder = registry.get("decoder", info.decoder)
        recon_name = reconstructor or info.reconstructor
        recon = registry.get("reconstructor", recon_name)
        seg = cls(info, net, decoder, recon, threads)
        seg.plugin_names["reconstructor"] = recon_name
        return seg

    # -- warm-up -------------------------------------------------------------------------
    def start_warm_up(self) -> None:
        """Once per segmenter: run the reconstructor's optional ``warm_up()`` (e.g. loading
        JIT-compiled code) in a background thread, so that it overlaps the network pass
        instead of delaying the first image's masks. :meth:`reconstruct` waits for it, so the
        reconstructor is never called from two threads at once. A warm-up that fails is
        ignored: the real call reports the problem."""
        warm = getattr(self.reconstructor, "warm_up", None)
        if not callable(warm):
            return

        def run() -> None:
            try:
                warm()
            except Exception:  # noqa: BLE001 - the real call raises it where it belongs
                pass

        with self._warm_up_lock:
            if self._warm_up is None:
                self._warm_up = threading.Thread(target=run, name="cellplug-warm-up",
                                                 daemon=True)
                self._warm_up.start()

    def finish_warm_up(self) -> None:
        """Wait for the warm-up started by :meth:`start_warm_up`, if any."""
        if self._warm_up is not None:
            self._warm_up.join()

    # -- steps ---------------------------------------------------------------------------
    def prepare(self, image: np.ndarray, opts: SegmentOptions) -> np.ndarray:
        """(Y, X[, C]) any real dtype -> float32 (C, Y, X) normalised input at the original size.

        Raises :class:`CellplugError` for an empty image, and for pixel values that
        :func:`cellplug.transforms.check_pixel_values` refuses.
        """
        image = np.asarray(image)
        if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
            raise CellplugError(f"expected a non-empty image (Y, X) or (Y, X, C), got shape "
                                f"{image.shape}")
        transforms.check_pixel_values(image)
        return transforms.prepare_image(
            image, opts.channels, self.model.n_channels, opts.percentiles, opts.invert
        )

    def network(
        self, prepared: np.ndarray, rescale: float, opts: SegmentOptions, resample: bool = True
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Run the network on ``prepared`` (float32 (C, Y, X)) scaled by ``rescale``.

        Returns raw float32 (K, Y, X) (or (K, Y', X') at the rescaled size when ``resample``
        is False), style float32 (S,) and the number of network passes.
        """
        shape = prepared.shape[1:]
        if opts.tile == "grid":
            return self.network_window(lambda ys, xs: prepared[:, ys, xs], shape, rescale,
                                       (0, shape[0], 0, shape[1]), opts, resample)
        self.start_warm_up()
        x = prepared
        if rescale != 1.0:
            x = transforms.resize(prepared, transforms.rescaled_shape(shape, rescale),
                                  torch_free=self.torch_free)
        with _threads(self.threads, self.net):
            out = run_network(
                self.net,
                x,
                tile=opts.tile,
                bsize=opts.bsize,
                tile_overlap=opts.tile_overlap,
                batch_size=opts.batch_size,
                augment=opts.augment,
                vector_channels=self.vector_channels,  # type: ignore[arg-type]
                precision=opts.precision,  # type: ignore[arg-type]
            )
        raw = out.raw
        if resample and raw.shape[1:] != shape:
            raw = transforms.resize(raw, shape, torch_free=self.torch_free)
        return raw, out.style, out.n_tiles

    def network_window(
        self, read: Any, shape: tuple[int, int], rescale: float,
        box: tuple[int, int, int, int], opts: SegmentOptions, resample: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Grid-tiled network output (:mod:`cellplug.aligned`) over ``box`` (y0, y1, x0, x1)
        of an image of ``shape`` whose normalised pixels ``read(ys, xs)`` gives (float32
        (C, h, w)): the same values at a pixel whatever the box. Returns raw float32 (K, h, w)
        (or the whole rescaled image's without ``resample``), style, number of tiles."""
        from .aligned import network_window

        if opts.augment:
            raise CellplugError("tile 'grid' does not combine with test-time augmentation")
        self.start_warm_up()
        with _threads(self.threads, self.net):
            return network_window(self.net, read, shape, rescale, box, bsize=opts.bsize,
                                  tile_overlap=opts.tile_overlap, batch_size=opts.batch_size,
                                  precision=opts.precision, resample=resample)

    def segment_window(
        self, read: Any, shape: tuple[int, int], box: tuple[int, int, int, int],
        opts: SegmentOptions, diameter: float,
    ) -> Segmentation:
        """Segment ``box`` (y0, y1, x0, x1) of an image of ``shape`` (Y, X) at a known
        ``diameter``, its network output computed as a whole-image ``tile="grid"`` run would
        (see :meth:`network_window`); ``read(ys, xs)`` gives the image's normalised pixels.
        Labels cover the box; objects cut by its edges are the caller's business."""
        t0 = time.perf_counter()
        # the memory check is the box's: only the box is rescaled
        check_rescale((box[1] - box[0], box[3] - box[2]), self.model.diam_mean, float(diameter))
        rescale = self.model.diam_mean / float(diameter)
        raw, style, n_tiles = self.network_window(read, shape, rescale, box, opts)
        flows, cellprob = self.decode(raw)
        t1 = time.perf_counter()
        niter = opts.niter or default_niter(rescale, True)
        labels = self.reconstruct(flows, cellprob, niter, opts)
        t2 = time.perf_counter()
        return Segmentation(labels, flows, cellprob, style, float(diameter),
                            {"network": t1 - t0, "masks": t2 - t1, "total": t2 - t0}, n_tiles)

    def decode(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw float32 (K, Y, X) -> flows float32 (2, Y, X), cellprob float32 (Y, X)."""
        try:
            flows, cellprob = self.decoder.decode(raw)
            flows, cellprob = np.asarray(flows, np.float32), np.asarray(cellprob, np.float32)
            ok = flows.shape == (2, *raw.shape[1:]) and cellprob.shape == raw.shape[1:]
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CellplugError(
                f"flow decoder {self.model.decoder!r} broke its contract: decode() must return "
                f"flows (2, Y, X) and cellprob (Y, X) for raw output {raw.shape}"
            )
        return flows, cellprob

    def reconstruct(
        self,
        flows: np.ndarray,
        cellprob: np.ndarray,
        niter: int,
        opts: SegmentOptions,
        shape: tuple[int, int] | None = None,
        **extra: Any,
    ) -> np.ndarray:
        """Labels uint32 (Y, X) from flows float32 (2, Y', X') and cellprob float32 (Y', X').

        With ``shape`` different from the maps' size, labels are resized (nearest) to
        ``shape`` and ``opts.min_size`` applies at that size, as Cellpose does.
        """
        resize = shape is not None and tuple(shape) != cellprob.shape
        self.finish_warm_up()
        labels = self.reconstructor(
            flows,
            cellprob,
            niter=niter,
            cellprob_threshold=opts.cellprob_threshold,
            flow_threshold=opts.flow_threshold,
            min_size=0 if resize else opts.min_size,
            max_size_fraction=opts.max_size_fraction,
            **extra,
        )
        labels = np.asarray(labels)
        if labels.shape != cellprob.shape or not (
            np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool
        ):
            raise CellplugError(
                f"reconstructor {getattr(self.reconstructor, '__name__', self.reconstructor)!r} "
                f"broke its contract: returned {labels.dtype} {labels.shape}, expected integer "
                f"labels of shape {cellprob.shape}"
            )
        labels = labels.astype(np.uint32, copy=False)
        if resize:
            labels = remove_small_objects(
                transforms.resize(labels, shape, nearest=True), opts.min_size
            )
        return labels

    def estimate_diameter(self, image: np.ndarray, opts: SegmentOptions | None = None) -> float:
        """Object diameter (pixels) of ``image`` (Y, X[, C]), as Cellpose's size model does it.

        1. style vector at the model's default scale -> linear regression -> first guess;
        2. segment at that guess (no resampling) and take the median mask diameter.
        Falls back to the model's mean training diameter when it has no size model.
        """
        opts = opts or SegmentOptions()
        size_model = self.model.size_model
        if size_model is None:
            return self.model.diam_labels
        prepared = self.prepare(image, opts)
        return self._estimate_diameter(prepared, opts)

    def default_scale_style(self, prepared: np.ndarray, opts: SegmentOptions) -> np.ndarray:
        """Style float32 (S,) of ``prepared`` (float32 (C, Y, X)) at the model's default scale
        (``diam_mean / diam_labels``): the first pass of the size model, and the style that
        ``--model auto`` compares with the zoo's centroids."""
        _, style, _ = self.network(
            prepared, self.model.diam_mean / self.model.diam_labels, _size_options(opts),
            resample=False,
        )
        return style

    def size_and_style(
        self, prepared: np.ndarray, opts: SegmentOptions
    ) -> tuple[float, np.ndarray]:
        """(diameter, default-scale style) of ``prepared``, with the style pass run once.

        The diameter is the size model's estimate, or ``diam_labels`` without a size model.
        """
        style = self.default_scale_style(prepared, opts)
        if self.model.size_model is None:
            return self.model.diam_labels, style
        return self._estimate_diameter(prepared, opts, style), style

    def _estimate_diameter(
        self, prepared: np.ndarray, opts: SegmentOptions, style: np.ndarray | None = None
    ) -> float:
        size_model = self.model.size_model
        assert size_model is not None
        dm = size_model.diam_mean  # Cellpose rescales to the size model's diam_mean here
        if style is None:
            style = self.default_scale_style(prepared, opts)
        guess = size_model.predict(style)
        rescale = dm / guess
        raw, _, _ = self.network(prepared, rescale, _size_options(opts), resample=False)
        flows, cellprob = self.decode(raw)
        # Cellpose runs these dynamics without interpolation; reconstructors may ignore it
        labels = self.reconstruct(
            flows, cellprob, 200, opts, shape=prepared.shape[1:], interp=False
        )
        d = median_diameter(labels)
        return d if d > 0 and np.isfinite(d) else dm

    # -- the whole thing -----------------------------------------------------------------
    def segment(
        self, image: np.ndarray, options: SegmentOptions | None = None, **overrides: Any
    ) -> Segmentation:
        """Segment one image (Y, X) or (Y, X, C), any real dtype.

        Options come from ``options`` (a :class:`SegmentOptions`) updated with keyword
        ``overrides``. Returns a :class:`Segmentation` at the size of ``image``.
        """
        opts = merge_options(options, overrides)
        t0 = time.perf_counter()
        prepared = self.prepare(image, opts)
        timings = {"prepare": time.perf_counter() - t0}
        diameter = opts.diameter
        if diameter is None or diameter <= 0:
            ts = time.perf_counter()
            if self.model.size_model is not None:
                diameter = self._estimate_diameter(prepared, opts)
            else:
                diameter = self.model.diam_labels
            timings["size"] = time.perf_counter() - ts
        return self.segment_prepared(prepared, opts, float(diameter), timings, t0)

    def segment_prepared(
        self,
        prepared: np.ndarray,
        opts: SegmentOptions,
        diameter: float,
        timings: dict[str, float] | None = None,
        t0: float | None = None,
    ) -> Segmentation:
        """Segment ``prepared`` (float32 (C, Y, X), from :meth:`prepare`) at a known
        ``diameter`` (pixels): the network pass at that scale and the masks.

        ``timings`` (steps already done) and ``t0`` (when they started) make the returned
        ``timings["total"]`` cover them too.
        """
        timings = dict(timings or {})
        t0 = time.perf_counter() if t0 is None else t0
        rescale = check_rescale(prepared.shape[1:], self.model.diam_mean, float(diameter))
        t1 = time.perf_counter()
        raw, style, n_tiles = self.network(prepared, rescale, opts, resample=opts.resample)
        flows, cellprob = self.decode(raw)
        timings["network"] = time.perf_counter() - t1
        niter = opts.niter or default_niter(rescale, opts.resample)
        t2 = time.perf_counter()
        labels = self.reconstruct(flows, cellprob, niter, opts, shape=prepared.shape[1:])
        timings["masks"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return Segmentation(labels, flows, cellprob, style, float(diameter), timings, n_tiles,
                            resampled=opts.resample)

    def remask(
        self, segmentation: Segmentation, options: SegmentOptions | None = None,
        **overrides: Any,
    ) -> Segmentation:
        """Labels again from ``segmentation``'s network output, with other mask options.

        Only the reconstruction runs (as in Cellpose's GUI when a threshold changes): the
        options that count are ``cellprob_threshold``, ``flow_threshold``, ``min_size``,
        ``max_size_fraction`` and ``niter``; those that change the network's input or output
        (diameter, channels, tiling...) need :meth:`segment`. ``segmentation`` must come from
        this segmenter's model. Returns a new :class:`Segmentation` sharing the flows,
        cellprob and style, with the labels :meth:`segment` gives with these options.
        """
        opts = merge_options(options, overrides)
        t0 = time.perf_counter()
        rescale = self.model.diam_mean / segmentation.diameter
        niter = opts.niter or default_niter(rescale, segmentation.resampled)
        labels = self.reconstruct(segmentation.flows, segmentation.cellprob, niter, opts,
                                  shape=segmentation.labels.shape)
        seconds = time.perf_counter() - t0
        return replace(segmentation, labels=labels, timings={"masks": seconds, "total": seconds})


def _size_options(opts: SegmentOptions) -> SegmentOptions:
    """Options of the size model's passes and of the style ``auto`` compares: Cellpose's
    tiles for ``tile="grid"``. The grid's tiles reach past the image into zeros, and their
    styles moved the size model's estimate by ~15 % (39.5 -> 33.5 px on the Usiigaci
    mosaic); the diameter is one number per image (or per block-wise run), so it needs no
    independence from where a window falls, and the zoo's centroids are Cellpose-tiled."""
    return replace(opts, tile=True) if opts.tile == "grid" else opts


def merge_options(options: SegmentOptions | None, overrides: dict[str, Any]) -> SegmentOptions:
    """``options`` (default: :class:`SegmentOptions`) with keyword ``overrides`` applied;
    a TypeError names unknown ones."""
    opts = options or SegmentOptions()
    if overrides:
        unknown = set(overrides) - set(SegmentOptions.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown segmentation option(s): {', '.join(sorted(unknown))}")
        opts = SegmentOptions(**{**opts.__dict__, **overrides})
    return opts


MAX_UPSCALE = 10.0
"""Largest factor an image is enlarged by to bring its objects to the model's diameter.

Objects smaller than a tenth of ``diam_mean`` (1.7 px for the bundled model) cannot be
segmented anyway, and the enlarged image grows with the square of the factor."""
BYTES_PER_RESCALED_PIXEL = 40  # input, raw outputs, tile weights and blend buffers, float32


def check_rescale(shape: Sequence[int], diam_mean: float, diameter: float) -> float:
    """The factor ``diam_mean / diameter`` for an image of ``shape`` (Y, X), if usable.

    Raises :class:`CellplugError` when the diameter is not a positive finite number, when the
    factor exceeds :data:`MAX_UPSCALE`, or when the rescaled image would need more memory
    than :func:`cellplug.io.max_image_bytes` allows, saying which.
    """
    from .io import max_image_bytes

    if not (np.isfinite(diameter) and diameter > 0):
        raise CellplugError(f"invalid diameter {diameter!r}: must be a positive number of pixels")
    rescale = diam_mean / diameter
    if rescale > MAX_UPSCALE:
        raise CellplugError(
            f"diameter {diameter:g} px is too small for this model (diam_mean {diam_mean:g}): "
            f"the image would be enlarged {rescale:.3g}x, at most {MAX_UPSCALE:g}x is allowed; "
            f"give a diameter of at least {diam_mean / MAX_UPSCALE:.3g} px"
        )
    ny, nx = transforms.rescaled_shape((int(shape[0]), int(shape[1])), rescale)
    need = float(ny) * nx * BYTES_PER_RESCALED_PIXEL
    if need > max_image_bytes():
        raise CellplugError(
            f"diameter {diameter:g} px would rescale the image to {ny} x {nx} pixels, needing "
            f"about {need / 2**30:.1f} GiB (limit {max_image_bytes() / 2**30:g} GiB, "
            f"CELLPLUG_MAX_IMAGE_GIB); give a larger diameter or split the image"
        )
    return rescale


def default_niter(rescale: float, resample: bool = True) -> int:
    """Cellpose's number of dynamics steps for a network run at ``rescale``.

    200 steps at the network's scale, i.e. 200 / ``rescale`` when the flows were resampled to
    the original size, else 200.
    """
    return int(np.float64(1.0 / rescale * 200.0) if resample else 200)


class _threads:
    """Temporarily set torch's intra-op thread count (None: leave it). An array backbone
    (``net.takes_arrays``) runs its own engine and takes ``threads`` as an attribute."""

    def __init__(self, n: int | None, net: Any = None) -> None:
        self.n = n
        self.old: int | None = None
        self.net = net

    def __enter__(self) -> None:
        if self.n and getattr(self.net, "takes_arrays", False):
            self.net.threads = self.n
        elif self.n:
            import torch

            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            import torch

            torch.set_num_threads(self.old)
