"""Optical flow from OpenCV (DIS or Farneback) on source frames, resized to the latent grid."""

from __future__ import annotations

import cv2
import numpy as np
import torch

METHODS = ("dis", "farneback")


def optical_flow(frame: np.ndarray, target: np.ndarray, method: str = "dis") -> np.ndarray:
    """Flow ``(H, W, 2)`` with ``frame(x) ~ target(x + flow(x))``, from uint8 RGB frames.

    Both estimators take 8-bit grayscale, the range they are tuned for.
    """
    a = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(np.ascontiguousarray(target), cv2.COLOR_RGB2GRAY)
    if method == "dis":
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(a, b, None)
    if method == "farneback":
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    raise ValueError(f"unknown flow method {method!r}; choose one of {METHODS}")


def resize_flow(flow: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a flow field to ``(height, width)`` and scale its vectors by the same factors."""
    h, w = flow.shape[:2]
    resized = cv2.resize(flow, (width, height), interpolation=cv2.INTER_AREA if height < h else cv2.INTER_LINEAR)
    return resized * np.array([width / w, height / h], dtype=np.float32)


def clip_flows(
    frames: np.ndarray, num_reference: int, height: int, width: int, method: str = "dis"
) -> torch.Tensor:
    """Flows ``(1, F-N, N, 2, h, w)`` from each new frame of a clip to each of its references.

    ``frames`` is the clip's source, uint8 ``(F, H, W, 3)``, references first.
    """
    new = frames[num_reference:]
    out = np.empty((len(new), num_reference, 2, height, width), dtype=np.float32)
    for j, frame in enumerate(new):
        for n in range(num_reference):
            out[j, n] = resize_flow(optical_flow(frame, frames[n], method), height, width).transpose(2, 0, 1)
    return torch.from_numpy(out).unsqueeze(0)
