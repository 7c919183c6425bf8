"""An independent statement of CLIP's published preprocessing, to check the scorer against."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(frames: np.ndarray, size: int) -> torch.Tensor:
    """Short side to ``size`` with PIL's antialiased bicubic (long side truncated, as the processor
    does), the centre ``size``² crop, [0, 1], OpenAI's mean and std."""
    out = []
    for frame in frames:
        h, w = frame.shape[:2]
        new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)  # (height, width)
        image = np.asarray(Image.fromarray(frame).resize((new[1], new[0]), Image.BICUBIC)).astype(np.float32) / 255
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        image = image[top : top + size, left : left + size]
        out.append((image - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
