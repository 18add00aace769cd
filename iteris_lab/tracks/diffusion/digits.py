"""Handwritten digits for the image tracks: sklearn's 8x8 digits upscaled, two measurable styles, and a judge.

Styles (the diffusion track's concepts), each with the number that measures it on an image batch (N, 1, H, W)
with values in [0, 1]:
- thick strokes: a 3x3 max-pool dilation;               measured by `ink`, the share of pixels above 0.5;
- slant:         a horizontal shear x' = x + shear·y;   measured by `slant_score`, -cov(x, y) / var(y) of the
                 intensity-weighted pixel coordinates (0 for upright digits, about the shear for slanted ones).
The content judge is a logistic regression on raw pixels, fitted on every style variant of the training images
so that thick or slanted digits are still read correctly; its held-out accuracy is part of every report.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as (N, 1, size, size) float32 in [0, 1] (bilinear upscaling) and labels (N,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return images, torch.tensor(data.target, dtype=torch.long)


def split_indices(labels: torch.Tensor, n_test: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded, stratified (train, test) split of the image indices; the two are disjoint."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    classes = labels.unique()
    per_class = n_test // len(classes)
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        test.append(idx[:per_class])
        train.append(idx[per_class:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def thicken(images: torch.Tensor) -> torch.Tensor:
    """Thick strokes: every pixel takes the maximum of its 3x3 neighbourhood."""
    return F.max_pool2d(images, kernel_size=3, stride=1, padding=1)


def slant(images: torch.Tensor, shear: float = 0.45) -> torch.Tensor:
    """Italic digits: output pixel (x, y) reads input (x - shear·y, y); y grows downwards, so tops lean right."""
    n = images.shape[0]
    theta = torch.tensor([[1.0, shear, 0.0], [0.0, 1.0, 0.0]], dtype=images.dtype).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def ink(images: torch.Tensor) -> torch.Tensor:
    """(N,) share of pixels brighter than 0.5."""
    return (images.flatten(1) > 0.5).float().mean(1)


def slant_score(images: torch.Tensor) -> torch.Tensor:
    """(N,) -cov(x, y) / var(y) of the intensity-weighted coordinates: how far x moves right per unit of height."""
    n, _, h, w = images.shape
    weight = images.clamp(min=0).reshape(n, h, w) + 1e-8
    y, x = torch.meshgrid(torch.arange(h, dtype=images.dtype), torch.arange(w, dtype=images.dtype), indexing="ij")
    total = weight.sum((1, 2))
    mx, my = (weight * x).sum((1, 2)) / total, (weight * y).sum((1, 2)) / total
    cov = (weight * (x - mx[:, None, None]) * (y - my[:, None, None])).sum((1, 2)) / total
    var = (weight * (y - my[:, None, None]) ** 2).sum((1, 2)) / total
    return -cov / var


STYLES = {"plain": lambda x: x, "thick": thicken, "slant": slant, "thick+slant": lambda x: slant(thicken(x))}


@dataclass
class DigitJudge:
    """Reads the digit in (N, 1, H, W) images in [0, 1]; `held_out` is its accuracy per style on unseen images."""

    model: object
    size: int
    held_out: dict[str, float]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.size:
            raise ValueError(f"the judge reads {self.size}x{self.size} images, got {tuple(images.shape[-2:])}.")
        return torch.as_tensor(self.model.predict(images.flatten(1).clamp(0, 1).numpy()))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images) == labels).float().mean())


def fit_judge(size: int = 16, seed: int = 0) -> DigitJudge:
    """A seeded logistic regression on the training images in all four styles (a few seconds)."""
    from sklearn.linear_model import LogisticRegression

    images, labels = digit_images(size)
    train, test = split_indices(labels, seed=seed)
    x = torch.cat([style(images[train]) for style in STYLES.values()]).flatten(1).numpy()
    y = np.tile(labels[train].numpy(), len(STYLES))
    model = LogisticRegression(max_iter=2000, C=0.5, random_state=seed).fit(x, y)
    judge = DigitJudge(model, size, {})
    judge.held_out = {name: judge.accuracy(style(images[test]), labels[test]) for name, style in STYLES.items()}
    return judge
