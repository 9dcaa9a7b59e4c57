"""Synthetic oblique, anisotropic cases in a scene: the module's self-test and the pytest suites use them.

Non-axis-aligned grids with anisotropic voxels are where a wrong axis order, a lost direction matrix or a float32
round-off shows up as a flipped, shifted or slanted mask.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ..data.io import Volume
from .scene import EXCHANGE_SUFFIX, add_volume_node, geometry_problems, write_volume_node
from .segmentations import export_training_folder, labels_to_segmentation, load_mask_file

def oblique_affine(spacing: Sequence[float], angles_deg: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """IJK-to-RAS with the given voxel size, rotated about x, y, z by ``angles_deg``."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(np.asarray(spacing, dtype=float))
    affine[:3, 3] = np.asarray(origin, dtype=float)
    return affine


def synthetic_arrays(shape: Sequence[int], seed: int = 0, blob_fraction: float = 0.22) -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) ``[i, j, k]``: an off-centre bright ellipsoid (label 1) in smooth noise."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    centre = rng.uniform(-0.25, 0.25, size=3)
    radii = np.full(3, blob_fraction * 2) * rng.uniform(0.8, 1.2, size=3)
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0
    image = (0.2 * rng.standard_normal(tuple(shape)) + 1.0 * inside + 0.3 * (grids[2] + 1)).astype(np.float32)
    return image, inside.astype(np.uint8)


def make_synthetic_case(scene: Any, name: str = "TensorPEFT synthetic", shape: Sequence[int] = (40, 36, 24),
                        spacing: Sequence[float] = (0.9, 1.1, 2.5), angles_deg: Sequence[float] = (17.0, -11.0, 23.0),
                        origin: Sequence[float] = (-21.5, 14.25, 7.125), seed: int = 0,
                        with_segmentation: bool = True) -> tuple[Any, Any | None]:
    """A non-axis-aligned, anisotropic volume node with a labelled blob (for the self-test and the tests)."""
    image, labels = synthetic_arrays(shape, seed)
    affine = oblique_affine(spacing, angles_deg, origin)
    volume = add_volume_node(scene, Volume(array=image, affine=affine), name)
    segmentation = None
    if with_segmentation:
        segmentation = labels_to_segmentation(scene, labels, volume, name=f"{volume.GetName()} label",
                                              segment_names={1: "blob"}, closed_surface=False, source=name)
    return volume, segmentation




def prepare_self_test(scene: Any, folder: str, cases: int = 2, seed: int = 0) -> dict[str, Any]:
    """Synthetic oblique, anisotropic cases in ``scene`` and on disk for the module's self-test: ``cases`` labelled
    pairs exported as a Decathlon folder, and one unlabelled volume exported for segmentation."""
    pairs = [make_synthetic_case(scene, name=f"TensorPEFT selftest {n + 1}", seed=seed + n) for n in range(cases)]
    train = os.path.join(folder, "train")
    exported = export_training_folder(scene, pairs, train)
    test_volume, _ = make_synthetic_case(scene, name="TensorPEFT selftest input", seed=seed + 100,
                                         angles_deg=(-8.0, 21.0, 33.0), spacing=(1.2, 0.8, 2.0), with_segmentation=False)
    test_image = write_volume_node(test_volume, os.path.join(folder, "input" + EXCHANGE_SUFFIX))
    return {"train": train, "cases": exported, "pairs": pairs, "test_volume": test_volume, "test_image": test_image}


def check_segmentation_result(scene: Any, volume: Any, mask_path: str, name: str | None = None) -> tuple[Any, list[str]]:
    """Import a worker's mask for ``volume`` and list what is wrong with the result (empty list: all good)."""
    segmentation = load_mask_file(scene, mask_path, volume, name=name)
    problems = geometry_problems(volume, segmentation)
    seg = segmentation.GetSegmentation()
    if seg.GetNumberOfSegments() > 0 and not seg.ContainsRepresentation("Closed surface"):
        problems.append(f"{segmentation.GetName()}: no closed-surface representation (it would not show in 3D)")
    return segmentation, problems
