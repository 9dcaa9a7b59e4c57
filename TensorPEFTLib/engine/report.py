"""PNG reports: training curves and a look at the data (overlays for segmentation, slice grids for synthesis).

Arrays are RAS-oriented volumes indexed [x, y, z] (as the data pipelines give them); views are drawn in the
radiological habit of 3D Slicer's axial / coronal / sagittal panes (superior and anterior up).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..atomic import write_atomically

VIEWS = ("axial", "coronal", "sagittal")


def _figure(*args: Any, **kwargs: Any):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, plt.subplots(*args, **kwargs)


def _save(fig: Any, plt: Any, path: str, dpi: int = 110) -> str:
    try:
        return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def view_slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """A 2D slice for display (rows top→bottom, columns left→right of the screen)."""
    if view == "axial":
        plane = volume[:, :, index]
    elif view == "coronal":
        plane = volume[:, index, :]
    else:
        plane = volume[index, :, :]
    return np.rot90(plane)  # first axis to columns, second axis pointing up


def as_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A stored volume's array reordered to the closest RAS axes (a permutation and flips, no resampling), so that
    ``view_slice`` shows true axial / coronal / sagittal planes of a scan stored LPS, sagittally or oblique."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(np.asarray(affine)), axcodes2ornt(("R", "A", "S")))
    return apply_orientation(np.asarray(array), transform)


def centre_of(mask: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """A point to slice through: the middle of the mask's part nearest to its centroid (the volume's centre if the
    mask is empty). Not the centroid itself: for a bilateral structure (both hippocampi) that lies on the midline,
    where a sagittal slice shows no mask; and not the mask voxel nearest to it either, which is the medial edge of
    one hippocampus, where a sagittal slice shows a sliver. So: the connected part holding that nearest voxel, and
    the voxel of that part nearest to the part's own centroid."""
    from scipy import ndimage

    if mask is None or not mask.any():
        return tuple(s // 2 for s in shape)  # type: ignore[return-value]

    def nearest_to_centroid(voxels: np.ndarray) -> np.ndarray:
        return voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]

    voxels = np.argwhere(mask > 0)
    parts, _ = ndimage.label(mask > 0)
    part = parts[tuple(nearest_to_centroid(voxels))]
    return tuple(int(c) for c in nearest_to_centroid(np.argwhere(parts == part)))  # type: ignore[return-value]


def _structure_colours(count: int) -> list[Any]:
    """``count`` colours for per-structure curves, none the mean's orange or the loss's blue (tab20 without them)."""
    import matplotlib

    table = [c for i, c in enumerate(matplotlib.colormaps["tab20"].colors) if i not in (0, 1, 2, 3)]
    return [table[i % len(table)] for i in range(count)]


def _curves(ax: Any, history: dict[str, Any], metric: str) -> None:
    steps = [r["step"] for r in history.get("steps", [])]
    losses = [r["loss"] for r in history.get("steps", [])]
    ax.plot(steps, losses, color="tab:blue", lw=1, alpha=0.5, label="training loss")
    if len(losses) >= 10:
        k = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="tab:blue", lw=2, label=f"training loss ({k}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals = history.get("evals", [])
    if evals:
        twin = ax.twinx()
        eval_steps = [e["step"] for e in evals]
        # several structures: each one's curve under the mean, which hides one that stays at 0
        names = list(dict.fromkeys(name for e in evals for name in (e.get("structures") or {})))
        colours = _structure_colours(len(names))
        for name, colour in zip(names, colours):
            twin.plot(eval_steps, [(e.get("structures") or {}).get(name, np.nan) for e in evals], ".--", lw=0.9,
                      color=colour, label=str(name))
        twin.plot(eval_steps, [e[metric] for e in evals], "o-", color="tab:orange", lw=2.2,
                  label=f"validation {metric}" + (" (mean)" if names else ""))
        twin.set_ylabel(f"validation {metric}")
        if metric == "dice":
            twin.set_ylim(-0.03 if names else 0, 1)  # a structure at 0 stays visible above the axis
        if names:  # beside the plot: ten names inside it would cover the curves
            twin.legend(loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=7, title="validation", title_fontsize=7)
        else:
            twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)


def segmentation_report(path: str, history: dict[str, Any], example: tuple | None, metric: str = "dice") -> str:
    """Curves on top; below, a validation case in three views: image, reference contour (green) and prediction (red)."""
    # hspace: room for the curves' "step" label above the views' titles
    plt, (fig, axes) = _figure(2, 3, figsize=(13, 8), gridspec_kw={"height_ratios": [1, 1.3], "hspace": 0.3})
    gs = axes[0, 0].get_gridspec()
    for ax in axes[0]:
        ax.remove()
    _curves(fig.add_subplot(gs[0, :]), history, metric)
    if example is None:
        for ax in axes[1]:
            ax.axis("off")
    else:
        image, label, pred, name = example
        centre = centre_of(label, image.shape)
        lo, hi = np.percentile(image, [1, 99.5])
        for ax, view, index in zip(axes[1], VIEWS, (centre[2], centre[1], centre[0])):
            ax.imshow(view_slice(image, view, index), cmap="gray", vmin=lo, vmax=hi)
            if (view_slice(label, view, index) > 0).any():
                ax.contour(view_slice(label, view, index) > 0, levels=[0.5], colors="lime", linewidths=1)
            if (view_slice(pred, view, index) > 0).any():
                ax.contour(view_slice(pred, view, index) > 0, levels=[0.5], colors="red", linewidths=1)
            ax.set_title(f"{name}: {view}", fontsize=9)
            ax.axis("off")
        fig.text(0.5, 0.02, "green: reference   red: adapted model", ha="center", fontsize=9)
    return _save(fig, plt, path)


def synthesis_report(path: str, history: dict[str, Any], samples: list[np.ndarray], real: list[np.ndarray]) -> str:
    """Curves on top; below, a grid: each row a volume (generated, then real), columns the three views."""
    rows = len(samples) + len(real)
    plt, (fig, axes) = _figure(rows + 1, 3, figsize=(9, 3 * (rows + 1)))
    gs = axes[0, 0].get_gridspec()
    for ax in axes[0]:
        ax.remove()
    _curves(fig.add_subplot(gs[0, :]), history, "val_loss")
    volumes = [(f"generated {i + 1}", v) for i, v in enumerate(samples)] + [(f"real {i + 1}", v) for i, v in enumerate(real)]
    for row, (title, volume) in enumerate(volumes, start=1):
        centre = tuple(s // 2 for s in volume.shape)
        for col, (view, index) in enumerate(zip(VIEWS, (centre[2], centre[1], centre[0]))):
            ax = axes[row, col]
            ax.imshow(view_slice(volume, view, index), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{title}: {view}", fontsize=9)
            ax.axis("off")
    return _save(fig, plt, path)


def slice_grid(path: str, volumes: list[np.ndarray], titles: list[str] | None = None) -> str:
    """Three views of each volume, one row per volume (``synthesize`` writes this next to the NIfTI files)."""
    plt, (fig, axes) = _figure(len(volumes), 3, figsize=(9, 3 * len(volumes)), squeeze=False)
    for row, volume in enumerate(volumes):
        centre = tuple(s // 2 for s in volume.shape)
        lo, hi = np.percentile(volume, [0.5, 99.5])
        for col, (view, index) in enumerate(zip(VIEWS, (centre[2], centre[1], centre[0]))):
            axes[row, col].imshow(view_slice(volume, view, index), cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
            axes[row, col].set_title(f"{(titles or [])[row] if titles else f'volume {row + 1}'}: {view}", fontsize=9)
            axes[row, col].axis("off")
    return _save(fig, plt, path)


def sample_rows(path: str, rows: Sequence[tuple[str, Sequence[np.ndarray]]], slices: dict[str, int],
                per_row: int = 3, dpi: int = 80) -> str:
    """Sets of volumes side by side, one row per set (e.g. base samples / adapted samples / target images): the same
    ``slices`` (view -> voxel index, clamped to the volume) of each set's first ``per_row`` volumes, all on the grey
    scale [0, 1], so that a difference between rows is a difference of the volumes."""
    shown = max(1, min(per_row, min(len(v) for _, v in rows)))
    views = list(slices)
    axis = {"axial": 2, "coronal": 1, "sagittal": 0}
    plt, (fig, axes) = _figure(len(rows), len(views) * shown, figsize=(2.1 * len(views) * shown, 2.3 * len(rows)),
                               squeeze=False)
    for r, (title, volumes) in enumerate(rows):
        for i in range(shown):
            volume = np.asarray(volumes[i])
            for k, view in enumerate(views):
                ax = axes[r, len(views) * i + k]
                index = min(int(slices[view]), volume.shape[axis[view]] - 1)
                ax.imshow(view_slice(volume, view, index), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{i + 1}: {view}", fontsize=9)
        axes[r, 0].set_ylabel(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path, dpi)


def synthesis_metrics_figure(path: str, real: list[np.ndarray], generated: list[np.ndarray], per_pair: list[float],
                             feats_real: np.ndarray | None, feats_gen: np.ndarray | None, metrics: dict[str, Any]) -> str:
    """What ``evaluate --kind synthesis`` measured, to look at: each MS-SSIM pair (real i beside generated i, mid
    axial and coronal slices, its value in the title; at most 4 pairs) and the two feature sets projected on their
    first two principal components (real vs generated), the metrics in the title."""
    shown = min(4, len(per_pair))
    plt, (fig, axes) = _figure(max(shown, 2), 5, figsize=(15, 3 * max(shown, 2)), squeeze=False)
    for row in range(axes.shape[0]):
        for col in range(4):
            axes[row, col].axis("off")
        if row >= shown:
            continue
        for offset, (label, volume) in enumerate((("real", real[row]), ("generated", generated[row]))):
            centre = tuple(s // 2 for s in volume.shape)
            for k, (view, index) in enumerate((("axial", centre[2]), ("coronal", centre[1]))):
                ax = axes[row, 2 * offset + k]
                ax.imshow(view_slice(volume, view, index), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"pair {row + 1} {label}: {view}" + (f"  MS-SSIM {per_pair[row]:.3f}"
                                                                   if offset == 1 and k == 0 else ""), fontsize=8)
    gs = axes[0, 4].get_gridspec()
    for row in range(axes.shape[0]):
        axes[row, 4].remove()
    ax = fig.add_subplot(gs[:, 4])
    if feats_real is not None and feats_gen is not None:
        both = np.concatenate([feats_real, feats_gen]).astype(np.float64)
        centred = both - both.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points = centred @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centred @ vt[:1].T, np.zeros(len(both))]
        n = len(feats_real)
        ax.scatter(points[:n, 0], points[:n, 1], c="tab:green", label="real", s=30)
        ax.scatter(points[n:, 0], points[n:, 1], c="tab:red", marker="x", label="generated", s=30)
        ax.legend(fontsize=8)
        ax.set_title("features (demo-unetr ViT), first two principal components", fontsize=8)
    else:
        ax.axis("off")

    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "-" if value is None else f"{value:.4g}"

    fig.suptitle(f"MS-SSIM {fmt('ms_ssim')} ({metrics.get('pairs')} pairs, window {metrics.get('ms_ssim_window')}, "
                 f"{metrics.get('ms_ssim_scales')} scales)   FD {fmt('fd_features')}   MMD features "
                 f"{fmt('mmd_features')}   MMD voxels {fmt('mmd_voxels')}", fontsize=10)
    return _save(fig, plt, path)
