"""Which images calibrate a model: a seeded random sample, stratified by class where labels exist.

User data arrives sorted: an ImageFolder lists class folders in order, an ImageNet train folder
holds about 1,300 images per class, so "the first 1,024" is one class. The authors' code shuffles;
we go further and stratify, so every class is represented in proportion (within one image), and
order the sample so that every prefix (the 64 images that initialise the activation quantizers)
is proportional too. Only the sampled images are decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.data import ImageDataset


@dataclass(frozen=True)
class CalibrationSample:
    """The sampled images (in sample order) and what the report and checkpoint header record."""

    images: torch.Tensor
    indices: np.ndarray
    seed: int
    population: int
    per_class_counts: dict[str, int] | None
    requested: int | None = None
    """The ``calib_size`` asked for; more than the data holds, the sample is all of it (``n``)."""

    def describe(self) -> dict[str, Any]:
        n = int(len(self.indices))
        out: dict[str, Any] = {"seed": self.seed, "n": n, "population": self.population, "requested": self.requested,
                               "stratified": self.per_class_counts is not None,
                               "per_class_counts": self.per_class_counts}
        if self.requested is not None and n < self.requested:
            out["note"] = (f"calib_size {self.requested} was asked for but the data holds {self.population} "
                           f"images: {n} calibrated the model (the config records {n})")
        return out


def _proportional_allocation(class_sizes: np.ndarray, n: int) -> np.ndarray:
    """Largest-remainder apportionment of ``n <= sum(class_sizes)`` draws: each class gets the floor
    or the ceiling of its quota ``size·n/total``, which never exceeds what it holds."""
    quota = class_sizes * (n / int(class_sizes.sum()))
    counts = np.floor(quota).astype(np.int64)
    short = n - int(counts.sum())
    if short > 0:
        counts[np.argsort(-(quota - counts), kind="stable")[:short]] += 1
    return counts


def sample_indices(labels: np.ndarray | None, population: int, n: int, seed: int) -> np.ndarray:
    """``min(n, population)`` distinct indices into the dataset.

    Unlabelled: a uniform random sample in random order. Labelled: per class a uniform random
    sample of its proportional share, interleaved so that any prefix stays proportional (class c's
    k-th image gets the key ``(k + u)/n_c`` with ``u`` uniform, and the sample is sorted by key).
    """
    rng = np.random.default_rng(seed)
    n = min(n, population)
    if labels is None:
        return rng.permutation(population)[:n]
    labels = np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(classes))
    counts = _proportional_allocation(sizes, n)
    chosen, keys = [], []
    for c, count in enumerate(counts):
        if count == 0:
            continue
        members = np.flatnonzero(inverse == c)
        picked = rng.choice(members, size=int(count), replace=False)
        chosen.append(picked)
        keys.append((np.arange(count) + rng.random(count)) / count)
    chosen_all, keys_all = np.concatenate(chosen), np.concatenate(keys)
    return chosen_all[np.argsort(keys_all, kind="stable")]


def calibration_sample(dataset: ImageDataset, n: int, seed: int) -> CalibrationSample:
    """Draw and decode the calibration images of a job (``n`` of them, or all there are)."""
    labels = dataset.labels if dataset.has_labels else None
    indices = sample_indices(labels, len(dataset), n, seed)
    per_class = None
    if labels is not None:
        names = dataset.classes
        picked = np.asarray(labels)[indices]
        values, counts = np.unique(picked, return_counts=True)
        per_class = {}
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            key = names[value] if names is not None and 0 <= value < len(names) else str(value)
            per_class[key] = int(count)
    return CalibrationSample(images=dataset.take(indices), indices=indices, seed=seed, population=len(dataset),
                             per_class_counts=per_class, requested=n)
