"""The Cellpose flow representation as a decoder: raw = (5 * dY, 5 * dX, cellprob logit)."""

from __future__ import annotations

from typing import Any

import numpy as np

FLOW_SCALE = 5.0  # the network predicts flows times 5 (Cellpose convention)


class CellposeFlows:
    """Targets, decoding and loss for the three-channel Cellpose output.

    Targets are float32 (3, H, W): binary foreground, unit flow Y, unit flow X. The raw
    network output is (3, H, W): 5 x flow Y, 5 x flow X, cell-probability logit.
    """

    name = "cellpose-flows"
    n_outputs = 3
    target_interpolation = ("nearest", "linear", "linear")
    vector_channels = (1, 2)  # (y, x) components that rotate with the image

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Training targets (3, H, W) float32 from labels (H, W) int, 0 = background."""
        from .heat import masks_to_flows  # numba: imported when training needs it

        flows = masks_to_flows(np.asarray(labels))
        return np.concatenate([(np.asarray(labels) > 0)[None].astype(np.float32), flows])

    def decode(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (3, H, W) -> flows float32 (2, H, W) at unit scale, cellprob float32 (H, W)."""
        raw = np.asarray(raw, dtype=np.float32)
        if raw.ndim != 3 or raw.shape[0] != self.n_outputs:
            raise ValueError(f"raw output must be (3, H, W), got {raw.shape}")
        return raw[:2] / FLOW_SCALE, raw[2]

    def loss(self, raw: Any, targets: Any) -> Any:
        """Cellpose loss: MSE(raw flows, 5 x target flows) / 2 + BCE(logit, foreground)."""
        import torch.nn.functional as F

        flow_loss = F.mse_loss(raw[:, :2], FLOW_SCALE * targets[:, 1:]) / 2.0
        prob_loss = F.binary_cross_entropy_with_logits(raw[:, 2], (targets[:, 0] > 0.5).float())
        return flow_loss + prob_loss
