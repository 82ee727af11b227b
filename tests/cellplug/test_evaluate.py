"""EvalReport and evaluate() on hand-made label pairs whose scores are worked out by hand.

Three 1 x 12 images of interval objects, scored at IoU 0.5 and 0.9 (AP = TP / (TP + FP + FN)):

- ``a``: one true object, found exactly: TP 1 at both thresholds, AP 1;
- ``b``: two true objects; the first is found with IoU 3/4 (a match at 0.5, not at 0.9), the
  second missed, and one false object: at 0.5 TP 1, FP 1, FN 1 (AP 1/3); at 0.9 TP 0, FP 2,
  FN 2 (AP 0);
- ``c``: one true object, nothing predicted: FN 1, AP 0.

Pooled at 0.5: TP 2, FP 1, FN 2: AP 2/5, precision 2/3, recall 1/2, F1 4/7; at 0.9: TP 1, FP 2,
FN 3: AP 1/6. Mean per-image AP at 0.5: (1 + 1/3 + 0) / 3, from the rounded 0.3333.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from cellplug.evaluate import EvalReport, evaluate, read_groups


def _row(*spans):
    lab = np.zeros((1, 12), np.int32)
    for k, (x0, x1) in enumerate(spans, 1):
        lab[0, x0:x1] = k
    return lab


PAIRS = [
    ("a", _row((0, 4)), _row((0, 4))),
    ("b", _row((0, 4), (6, 10)), _row((0, 3), (10, 12))),
    ("c", _row((2, 8)), _row()),
]
GROUPS = {"a": "g1", "b": "g1", "c": "g2"}


def test_rows_hold_counts_and_scores_per_image():
    rep = evaluate(PAIRS, GROUPS, thresholds=[0.5, 0.9])
    assert rep.thresholds == (0.5, 0.9)
    a, b, c = rep.rows
    assert (a["image"], a["group"], a["n_true"], a["n_pred"]) == ("a", "g1", 1, 1)
    assert (b["image"], b["group"], b["n_true"], b["n_pred"]) == ("b", "g1", 2, 2)
    assert (c["image"], c["group"], c["n_true"], c["n_pred"]) == ("c", "g2", 1, 0)
    assert (a["ap@0.50"], b["ap@0.50"], c["ap@0.50"]) == (1.0, 0.3333, 0.0)
    assert (a["ap@0.90"], b["ap@0.90"], c["ap@0.90"]) == (1.0, 0.0, 0.0)
    assert b["precision@0.50"] == 0.5 and b["recall@0.50"] == 0.5 and b["f1@0.50"] == 0.5
    assert c["precision@0.50"] == 1.0 and c["recall@0.50"] == 0.0  # nothing predicted
    assert list(a) == ["image", "group", "n_true", "n_pred", "ap@0.50", "ap@0.90",
                       "precision@0.50", "recall@0.50", "f1@0.50"]


def test_summary_pools_counts_and_averages_per_image_ap():
    rep = evaluate(PAIRS, GROUPS, thresholds=[0.5, 0.9])
    s = rep.summary()
    assert (s["n_images"], s["n_true"], s["n_pred"]) == (3, 4, 3)
    assert s["pooled_ap"] == {"0.50": 0.4, "0.90": 0.1667}
    assert s["mean_ap@0.50"] == 0.4444
    assert s["mean_ap"] == {"0.50": 0.4444, "0.90": 0.3333}
    assert (s["precision@0.50"], s["recall@0.50"], s["f1@0.50"]) == (0.6667, 0.5, 0.5714)


def test_group_summaries_use_only_their_images():
    rep = evaluate(PAIRS, GROUPS, thresholds=[0.5])
    assert rep.groups == ["g1", "g2"]
    g1, g2 = rep.summary("g1"), rep.summary("g2")
    assert (g1["n_images"], g1["n_true"], g1["n_pred"]) == (2, 3, 3)
    assert g1["pooled_ap"] == {"0.50": 0.5}  # TP 2, FP 1, FN 1
    assert g1["mean_ap"] == {"0.50": round((1 + 0.3333) / 2, 4)}
    assert (g2["n_images"], g2["n_true"], g2["n_pred"]) == (1, 1, 0)
    assert g2["pooled_ap"] == {"0.50": 0.0}
    d = rep.to_dict()
    assert d["thresholds"] == [0.5] and d["groups"] == {"g1": g1, "g2": g2}
    assert d["overall"] == rep.summary() and d["images"] == rep.rows and d["failed"] == []


def test_images_without_a_group_are_pooled_but_not_grouped():
    rep = evaluate(PAIRS, {"a": "g1"}, thresholds=[0.5])
    assert [r["group"] for r in rep.rows] == ["g1", "", ""]
    assert rep.groups == ["g1"]
    assert rep.summary()["n_images"] == 3 and rep.summary("g1")["n_images"] == 1
    rep = evaluate(PAIRS, None, thresholds=[0.5])
    assert rep.groups == [] and rep.to_dict()["groups"] == {}


def test_failures_are_listed_and_not_scored():
    rep = EvalReport((0.5,))
    rep.add("a", *PAIRS[0][1:])
    rep.fail("broken", "cannot read it")
    assert rep.failures == [{"image": "broken", "error": "cannot read it"}]
    assert rep.to_dict()["failed"] == [{"image": "broken", "error": "cannot read it"}]
    assert rep.summary()["n_images"] == 1


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_rows_then_groups_then_overall_mean(tmp_path):
    rep = evaluate(PAIRS, GROUPS, thresholds=[0.5])
    out = rep.write_csv(tmp_path / "r.csv")
    assert out == tmp_path / "r.csv"
    rows = _read(out)
    assert [r["image"] for r in rows] == ["a", "b", "c", "group:g1", "group:g2", "overall"]
    assert list(rows[0]) == list(rep.rows[0])  # no error column without failures
    g1, g2, overall = rows[3:]
    assert (g1["group"], g2["group"], overall["group"]) == ("g1", "g2", "")
    # mean of the per-image numbers, counts summed
    assert float(g1["ap@0.50"]) == round((1 + 0.3333) / 2, 4)
    assert overall["ap@0.50"] == "0.4444"  # not 0.44443
    assert overall["precision@0.50"] == "0.8333"  # (1 + 0.5 + 1) / 3
    assert overall["recall@0.50"] == "0.5" and overall["f1@0.50"] == "0.5"
    assert (g1["n_true"], g1["n_pred"], overall["n_true"], overall["n_pred"]) == (
        "3", "3", "4", "3")


def test_csv_lists_failures_with_their_error(tmp_path):
    rep = evaluate(PAIRS[:1], thresholds=[0.5])
    rep.fail("x", "unreadable")
    rows = _read(rep.write_csv(tmp_path / "r.csv"))
    assert [r["image"] for r in rows] == ["a", "overall", "x"]
    assert rows[0]["error"] == "" and rows[2]["error"] == "unreadable"
    assert rows[2]["ap@0.50"] == ""
    only_failures = EvalReport((0.5,))
    only_failures.fail("y", "bad")
    rows = _read(only_failures.write_csv(tmp_path / "f.csv"))
    assert rows == [{"image": "overall", "error": ""}, {"image": "y", "error": "bad"}]


def test_csv_columns_follow_the_first_row_and_ignore_extra_keys(tmp_path):
    rep = EvalReport((0.5,))
    rep.add("a", *PAIRS[0][1:])
    rep.add("b", *PAIRS[1][1:], diameter=17.0)  # a key the first row does not have
    rows = _read(rep.write_csv(tmp_path / "r.csv"))
    assert "diameter" not in rows[0] and [r["image"] for r in rows] == ["a", "b", "overall"]


def test_read_groups_splits_at_the_last_colon(tmp_path):
    folder = tmp_path / "a:b"
    folder.mkdir()
    meta = folder / "meta.csv"
    meta.write_text("stem,kind\nimg1,fluo\nimg2,phc\n")
    assert read_groups(f"{meta}:kind") == {"img1": "fluo", "img2": "phc"}
    single = tmp_path / "single.csv"
    single.write_text("stem,kind\nimg1,fluo\n")
    assert read_groups(f"{single}:kind") == {"img1": "fluo"}
    with pytest.raises(ValueError, match="CSV:COLUMN"):
        read_groups("meta.csv")
    with pytest.raises(ValueError, match="needs columns 'stem' and 'size'"):
        read_groups(f"{meta}:size")
    nostem = tmp_path / "nostem.csv"
    nostem.write_text("name,kind\nimg1,fluo\n")
    with pytest.raises(ValueError, match="stem"):
        read_groups(f"{nostem}:kind")
    empty = tmp_path / "empty.csv"
    empty.write_text("stem,kind\n")
    with pytest.raises(ValueError, match="needs columns"):
        read_groups(f"{empty}:kind")
