"""Scoring label images against ground truth: per image, per group, overall."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import DEFAULT_THRESHOLDS, MatchCounts, match_counts


@dataclass
class EvalReport:
    """Per-image rows plus pooled and mean scores, overall and per group.

    ``pooled`` AP sums TP/FP/FN over images before dividing; ``mean`` averages per-image
    AP (the number the Cellpose papers report).
    """

    thresholds: tuple[float, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)  # images that could not be scored
    _counts: dict[str, MatchCounts] = field(default_factory=dict, repr=False)

    def add(
        self, stem: str, true: np.ndarray, pred: np.ndarray, group: str = "", **extra: Any
    ) -> dict[str, Any]:
        mc = match_counts(true, pred, self.thresholds)
        row: dict[str, Any] = {
            "image": stem,
            "group": group,
            **extra,
            "n_true": int(mc.tp[0] + mc.fn[0]),
            "n_pred": int(mc.tp[0] + mc.fp[0]),
        }
        row.update(
            {f"ap@{t:.2f}": round(float(a), 4) for t, a in zip(self.thresholds, mc.ap, strict=True)}
        )
        row.update(
            {
                "precision@0.50": round(float(mc.precision[0]), 4),
                "recall@0.50": round(float(mc.recall[0]), 4),
                "f1@0.50": round(float(mc.f1[0]), 4),
            }
        )
        self.rows.append(row)
        for key in ("all", f"group:{group}" if group else None):
            if key:
                self._counts[key] = mc if key not in self._counts else self._counts[key] + mc
        return row

    def fail(self, stem: str, error: str) -> None:
        """Record an image that could not be scored (listed in the report, not in the scores)."""
        self.failures.append({"image": stem, "error": error})

    def summary(self, group: str | None = None) -> dict[str, Any]:
        rows = [r for r in self.rows if group is None or r["group"] == group]
        mc = self._counts["all" if group is None else f"group:{group}"]
        t0 = self.thresholds[0]
        return {
            "n_images": len(rows),
            "n_true": int(mc.tp[0] + mc.fn[0]),
            "n_pred": int(mc.tp[0] + mc.fp[0]),
            f"mean_ap@{t0:.2f}": round(float(np.mean([r[f"ap@{t0:.2f}"] for r in rows])), 4),
            "mean_ap": {
                f"{t:.2f}": round(float(np.mean([r[f"ap@{t:.2f}"] for r in rows])), 4)
                for t in self.thresholds
            },
            "pooled_ap": {
                f"{t:.2f}": round(float(a), 4) for t, a in zip(self.thresholds, mc.ap, strict=True)
            },
            "precision@0.50": round(float(mc.precision[0]), 4),
            "recall@0.50": round(float(mc.recall[0]), 4),
            "f1@0.50": round(float(mc.f1[0]), 4),
        }

    @property
    def groups(self) -> list[str]:
        return sorted({r["group"] for r in self.rows if r["group"]})

    def by_column(self, column: str = "model") -> dict[str, dict[str, dict[str, Any]]]:
        """{value of ``column``: {group ("all" and each group): images and mean AP@0.50}},
        e.g. which model ``--model auto`` chose for which image type, and how it did."""
        t0 = f"ap@{self.thresholds[0]:.2f}"
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for value in sorted({str(r[column]) for r in self.rows if column in r}):
            rows = [r for r in self.rows if str(r.get(column)) == value]
            cells = {}
            for g in ["all", *self.groups]:
                sel = [r for r in rows if g == "all" or r["group"] == g]
                if sel:
                    cells[g] = {"n_images": len(sel),
                                f"mean_{t0}": round(float(np.mean([r[t0] for r in sel])), 4)}
            out[value] = cells
        return out

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "thresholds": list(self.thresholds),
            "overall": self.summary() if self.rows else {},
            "groups": {g: self.summary(g) for g in self.groups},
            "images": self.rows,
            "failed": self.failures,
        }
        if any("model" in r for r in self.rows):
            doc["by_model"] = self.by_column("model")
        return doc

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """Per-image rows, then one row per group and one ``overall`` row (mean per-image),
        then one row per image that failed, with its ``error``."""
        from .io import atomic_path

        fields = (list(self.rows[0]) if self.rows else ["image"]) + (
            ["error"] if self.failures else []
        )
        extra_rows = []
        for g in [*self.groups, None]:
            rows = [r for r in self.rows if g is None or r["group"] == g]
            agg = {"image": "overall" if g is None else f"group:{g}", "group": g or ""}
            for k in fields:
                if k.startswith(("ap@", "precision", "recall", "f1")):
                    agg[k] = round(float(np.mean([r[k] for r in rows])), 4)
                elif k in ("n_true", "n_pred"):
                    agg[k] = int(sum(r[k] for r in rows))
            extra_rows.append(agg)
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows + extra_rows + self.failures)
        return Path(path)


def read_groups(spec: str) -> dict[str, str]:
    """``"metadata.csv:column"`` -> {stem: value} (the CSV needs a ``stem`` column)."""
    path, _, column = spec.rpartition(":")
    if not path:
        raise ValueError(f"--group-by must be CSV:COLUMN, got {spec!r}")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "stem" not in rows[0] or column not in rows[0]:
        raise ValueError(f"{path}: needs columns 'stem' and {column!r}")
    return {r["stem"]: r[column] for r in rows}


def evaluate(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]],
    groups: Mapping[str, str] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> EvalReport:
    """Score ``(stem, true labels, predicted labels)`` triples."""
    report = EvalReport(tuple(float(t) for t in thresholds))
    for stem, true, pred in pairs:
        report.add(stem, true, pred, (groups or {}).get(stem, ""))
    return report
