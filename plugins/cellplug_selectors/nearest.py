"""Pick, for each image, the model whose training-style centroid is closest (cosine)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def nearest_centroid(styles: np.ndarray, models: Sequence) -> list[str]:
    """Model name per image: highest cosine similarity between style and model centroid.

    Parameters
    ----------
    styles
        float32 (N, S) style vectors.
    models
        Candidates with ``name`` and ``style_centroid`` ((S,) or ``None``); models without a
        centroid are never picked.

    Returns
    -------
    list of str
        N model names.
    """
    styles = np.atleast_2d(np.asarray(styles, np.float64))
    usable = [m for m in models if m.style_centroid is not None]
    if not usable:
        raise ValueError("no candidate model has a style centroid")
    cents = np.stack([np.asarray(m.style_centroid, np.float64) for m in usable])
    if cents.shape[1] != styles.shape[1]:
        raise ValueError(
            f"style size {styles.shape[1]} differs from centroid size {cents.shape[1]}"
        )
    s = styles / np.linalg.norm(styles, axis=1, keepdims=True)
    c = cents / np.linalg.norm(cents, axis=1, keepdims=True)
    best = np.argmax(s @ c.T, axis=1)
    return [usable[i].name for i in best]
