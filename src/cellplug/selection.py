"""``--model auto``: choose a zoo model for each image from its style, then segment with it.

A zoo belongs to a *reference* model (the generalist). Each zoo model's metadata has a
``zoo`` block (written by :mod:`cellplug.zoo_build`)::

    {"reference": "generalist", "reference_sha256": "...", "cluster": 2, "n_images": 57,
     "min_similarity": 0.91, "spread": {...}}

and its ``style_centroid`` is the mean style of its cluster *as the reference model sees it*.
For an image, the reference model's style pass at its default scale (the first pass of its
size model) gives the style; a selector plugin picks a model; when the image's style is less
similar to that model's centroid than ``min_similarity`` (the least similar images of its own
cluster), the reference model segments it instead. A zoo model whose metadata says
``route_to_reference`` (it did not beat the reference on its cluster's held-out images, see
:mod:`cellplug.zoo_build`) keeps its cluster's centroid, so that its images are not sent to a
neighbouring cluster's model, but the reference model segments them.

The reference pass is done once: its style pass and its diameter estimate are reused, so the
chosen model runs only its own main pass, and the reference model, when chosen, nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CellplugError
from .models import DEFAULT_MODEL, ModelInfo, available_models, resolve_model
from .plugins import PluginRegistry, get_registry
from .segmenter import Segmentation, Segmenter, SegmentOptions, merge_options

DEFAULT_SELECTOR = "nearest-centroid"
AUTO = "auto"


@dataclass
class Choice:
    """Which model segmented an image, and why.

    similarity: cosine between the image's style and the chosen zoo model's centroid (the
    nearest one's when ``fallback``), ``None`` when the selector chose a model without one.
    routed: why the reference model segments an image whose cluster's model was selected (the
    zoo model's gate), ``None`` otherwise.
    """

    model: str
    nearest: str
    similarity: float | None
    threshold: float | None
    fallback: bool
    selector: str
    routed: str | None = None

    @property
    def reason(self) -> str:
        sim = "" if self.similarity is None else f"similarity {self.similarity:.3f}"
        if self.routed:
            return f"nearest zoo model {self.nearest!r} ({sim}): {self.routed}: reference model"
        if self.fallback:
            return (f"nearest zoo model {self.nearest!r} ({sim}) is below its threshold "
                    f"{self.threshold:.3f}: reference model")
        if self.threshold is None:
            return f"chosen by selector {self.selector!r}" + (f" ({sim})" if sim else "")
        return f"{self.selector}: {sim} (threshold {self.threshold:.3f})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "fallback": self.fallback,
            "routed": self.routed is not None,
            "reason": self.reason,
        }


def zoo_models(reference: ModelInfo, registry: PluginRegistry | None = None) -> list[ModelInfo]:
    """The models (of plugins and the user's folder) whose ``zoo.reference`` is
    ``reference``'s name, sorted by name; those with another input size are left out."""
    out = []
    for info in available_models(registry).values():
        zoo = info.metadata.get("zoo")
        if isinstance(zoo, dict) and zoo.get("reference") == reference.name and (
            info.style_centroid is not None and info.n_channels == reference.n_channels
        ):
            out.append(info)
    return sorted(out, key=lambda m: m.name)


def routed_reason(info: ModelInfo) -> str | None:
    """Why zoo model ``info`` hands its images to the reference model (its gate's scores),
    or ``None`` when it segments them itself."""
    zoo = info.metadata.get("zoo") or {}
    if not zoo.get("route_to_reference"):
        return None
    gate = zoo.get("gate") or {}
    ap = gate.get("ap50") or {}
    mix = gate.get("mix")
    key = f"{mix:.2f}" if isinstance(mix, (int, float)) else None
    if key in ap and "reference" in ap:
        return (f"it did not beat the reference on its cluster's {len(gate.get('images', []))} "
                f"held-out images (AP@0.5 {ap[key]:.3f} vs {ap['reference']:.3f})")
    return "its zoo entry routes its images to the reference"


def cosine(style: np.ndarray, centroid: np.ndarray) -> float:
    a = np.asarray(style, np.float64).ravel()
    b = np.asarray(centroid, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class AutoSegmenter:
    """Segments each image with the zoo model its style selects (see the module's doc).

    ``reference``: the reference model's :class:`Segmenter`; ``candidates``: the zoo models;
    ``select``: a selector, ``select(styles (N, S), candidates) -> N names``.
    """

    def __init__(
        self,
        reference: Segmenter,
        candidates: Sequence[ModelInfo],
        select: Callable[[np.ndarray, Sequence[ModelInfo]], Sequence[str]],
        selector_name: str = DEFAULT_SELECTOR,
        registry: PluginRegistry | None = None,
        threads: int | None = None,
    ) -> None:
        if not candidates:
            raise CellplugError(
                f"--model auto: no zoo models for reference model {reference.model.name!r}; "
                f"build one with 'cellplug zoo build' or install a model pack"
            )
        self.reference = reference
        self.candidates = {m.name: m for m in candidates}
        self.select = select
        self.selector_name = selector_name
        self.registry = registry or get_registry()
        self.threads = threads
        self._segmenters: dict[str, Segmenter] = {reference.model.name: reference}

    @classmethod
    def from_zoo(
        cls,
        reference: str | None = None,
        selector: str | None = None,
        registry: PluginRegistry | None = None,
        threads: int | None = None,
    ) -> AutoSegmenter:
        """The zoo of ``reference`` (default: the default model) with selector plugin
        ``selector`` (default: ``nearest-centroid``)."""
        registry = registry or get_registry()
        selector = selector or DEFAULT_SELECTOR
        select = registry.get("selector", selector)
        info = resolve_model(reference or DEFAULT_MODEL, registry)
        ref = Segmenter.from_info(info, registry, threads=threads)
        return cls(ref, zoo_models(info, registry), select, selector, registry, threads)

    @property
    def model(self) -> ModelInfo:
        """The reference model (what a single-model caller would show)."""
        return self.reference.model

    def choose(self, styles: np.ndarray) -> list[Choice]:
        """One :class:`Choice` per style vector (float32 (N, S))."""
        styles = np.atleast_2d(np.asarray(styles, np.float32))
        cands = list(self.candidates.values())
        names = list(self.select(styles, cands))
        if len(names) != len(styles):
            raise CellplugError(f"style selector {self.selector_name!r} broke its contract: "
                                f"{len(names)} names for {len(styles)} images")
        out = []
        for style, name in zip(styles, names, strict=True):
            name = str(name)
            if name != self.reference.model.name and name not in self.candidates:
                raise CellplugError(f"style selector {self.selector_name!r} chose {name!r}, "
                                    f"which is not a candidate ({', '.join(self.candidates)})")
            info = self.candidates.get(name)
            sim = threshold = None
            if info is not None and info.style_centroid is not None:
                sim = cosine(style, info.style_centroid)
                t = info.metadata["zoo"].get("min_similarity")
                threshold = None if t is None else float(t)
            fallback = threshold is not None and sim is not None and sim < threshold
            routed = None if fallback or info is None else routed_reason(info)
            chosen = self.reference.model.name if fallback or routed else name
            out.append(Choice(chosen, name, sim, threshold, fallback, self.selector_name,
                              routed))
        return out

    def segmenter_for(self, name: str) -> Segmenter:
        """The :class:`Segmenter` of model ``name``, built once."""
        if name not in self._segmenters:
            info = self.candidates[name]
            self._segmenters[name] = Segmenter.from_info(info, self.registry,
                                                         threads=self.threads)
        return self._segmenters[name]

    def segment(
        self, image: np.ndarray, options: SegmentOptions | None = None, **overrides: Any
    ) -> tuple[Segmentation, Choice]:
        """Segment ``image`` (Y, X) or (Y, X, C) with the model its style selects.

        Without a diameter, the reference model's estimate is used by the chosen model too
        (zoo models are fine-tuned from the reference and keep its object scale).
        """
        opts = merge_options(options, overrides)
        t0 = time.perf_counter()
        prepared = self.reference.prepare(image, opts)
        timings = {"prepare": time.perf_counter() - t0}
        ts = time.perf_counter()
        if opts.diameter is None or opts.diameter <= 0:
            diameter, style = self.reference.size_and_style(prepared, opts)
            timings["size"] = time.perf_counter() - ts
        else:
            diameter = float(opts.diameter)
            style = self.reference.default_scale_style(prepared, opts)
            timings["style"] = time.perf_counter() - ts
        tc = time.perf_counter()
        choice = self.choose(style[None])[0]
        timings["choose"] = time.perf_counter() - tc
        seg = self.segmenter_for(choice.model).segment_prepared(
            prepared, opts, diameter, timings, t0
        )
        return seg, choice
