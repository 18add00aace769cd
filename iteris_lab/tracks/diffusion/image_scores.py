"""Scoring and saving generated RGB images: CLIP-T / CLIP-I (the usual DreamBooth metrics) and image grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def to_pixels(images: Sequence, resolution: int) -> torch.Tensor:
    """PIL images -> (N, 3, resolution, resolution) in [-1, 1]: shorter side resized, then center-cropped."""
    from PIL import Image

    out = []
    for image in images:
        scale = resolution / min(image.size)
        w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
        image = image.convert("RGB").resize((w, h), Image.BICUBIC)
        left, top = (w - resolution) // 2, (h - resolution) // 2
        array = np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
        out.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


class ClipScorer:
    """CLIP-T (image–prompt cosine) and CLIP-I (image–reference image cosine), the usual DreamBooth metrics."""

    def __init__(self, model_id: str, device):
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.size, self.device = self.model.config.vision_config.image_size, device

    @torch.no_grad()
    def images(self, images: Sequence) -> torch.Tensor:
        """(N, d) unit image embeddings; CLIP's resize, center crop and normalization."""
        pixels = (to_pixels(images, self.size) + 1) / 2
        mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
        features = self.model.get_image_features(pixel_values=((pixels - mean) / std).to(self.device))
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        features = self.model.get_text_features(**tokens)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def save_grid(images: list, columns: int, path) -> str:
    """Images as a grid (one row per prompt) in one PNG; returns the path."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return str(path)
