"""Requests a GUI sends to the worker: each validates itself and builds its own ``tensorpeft`` command line.

The shape follows SlicerNNUnet's ``Parameter``: :meth:`Request.problems` lists what is wrong (one line each,
naming the option or file and how to fix it), :meth:`Request.isValid` says whether there is nothing,
:meth:`Request.asArgList` gives the CLI arguments (the same command a terminal user types, always with
``--events -``). Field names are the Slicer parameter node's, so :meth:`Request.fromParameters` fills a request
from the node (or any object with those attributes) by name: nothing is re-declared under another name.
Torch-free: building a request imports only the torch-free catalog, preset table and shipped-model cards.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

from ..models.presets import BUNDLE_CONFIG_NAMES

MODEL_KINDS = ("UNETR", "DDPM")
#: panel choice → ``--device`` value
DEVICE_CHOICES = {"auto": "auto", "GPU": "cuda", "CPU": "cpu"}
FLIP_CHOICES = ("auto", "all", "lr", "none")
#: ``--skull-strip`` of finetune and segment (the library's ``data.preprocess.SKULL_STRIP_CHOICES``, which imports
#: numpy: a test checks they are the same), with what each means for the panel's tooltip and the page's list
SKULL_STRIP_CHOICES = ("auto", "on", "off")
SKULL_STRIP_HELP = {
    "auto": "whole heads are skull-stripped, brains and other scans left as they are",
    "on": "every scan is skull-stripped; one that is not a T1 head is refused",
    "off": "scans are used as they are",
}


class RequestError(ValueError):
    """A problem with what the user chose (one line: what is wrong, which option or file, how to fix it)."""


def method_summaries() -> dict:
    """Method name → one-line summary, in the order a GUI offers them (from :mod:`TensorPEFTLib.adapters.catalog`)."""
    from ..adapters.catalog import METHODS

    return {name: info.summary for name, info in METHODS.items()}


#: the adapter catalog's model family behind each panel model kind
FAMILY_OF_KIND = {"UNETR": "unetr", "DDPM": "ddpm"}


def default_learning_rate(model_kind: str, method: str) -> float:
    """What ``finetune`` trains ``method`` with on a ``model_kind`` model when the panel leaves the learning rate at
    0 ("auto"): the method's default for the family (:data:`TensorPEFTLib.adapters.catalog.DEFAULT_LR`)."""
    from ..adapters.catalog import default_lr

    return default_lr(method, FAMILY_OF_KIND.get(model_kind, "generic"))


def demo_model(model_kind: str) -> str:
    """The built-in model of a family (its model card names the preset it was trained on)."""
    from ..models.shipped import SHIPPED_MODELS, model_card

    family = model_kind.lower()
    return next(name for name in SHIPPED_MODELS if str(model_card(name).get("preset", "")).startswith(family + "-"))


def estimate_preset(model_kind: str, model: str) -> str:
    """The preset a model is built on: a demo model's, a preset name itself, else the family's paper preset (a
    checkpoint file of that family)."""
    from ..models.presets import PRESETS
    from ..models.shipped import SHIPPED_MODELS, model_card

    if model in SHIPPED_MODELS:
        return str(model_card(model)["preset"])
    if model in PRESETS:
        return model
    return f"{model_kind.lower()}-paper"


def cli_command(python: str, args: Sequence[str]) -> List[str]:
    """The argv that runs ``tensorpeft ARGS`` with ``python`` (Slicer's own Python inside Slicer)."""
    return [python, "-m", "TensorPEFTLib.cli", *[str(a) for a in args]]


def _number(value: float) -> str:
    return f"{float(value):g}"


def _looks_like_file(text: str) -> bool:
    return os.sep in text or "/" in text or os.path.splitext(text)[1] != ""


def _skull_strip_problems(mode: str) -> List[str]:
    if mode in SKULL_STRIP_CHOICES:
        return []
    return [f"whole-head scans {mode!r}: choose auto (skull-strip whole heads), on or off"]


@dataclass
class Request:
    """Base of every request: validation and the command line, from :meth:`problems` and :meth:`_args`."""

    @classmethod
    def fromParameters(cls, parameters: Any, **values: Any) -> "Request":
        """A request from the same-named attributes of ``parameters`` (the parameter node), then ``values``."""
        names = [f.name for f in dataclasses.fields(cls)]
        taken = {n: getattr(parameters, n) for n in names if n not in values and hasattr(parameters, n)}
        for name, value in taken.items():
            if isinstance(getattr(cls, name, None), str):  # a text field: paths too, and an unset node → ""
                taken[name] = "" if value is None else str(value)
        return cls(**taken, **values)

    def problems(self) -> List[str]:
        raise NotImplementedError

    def isValid(self) -> bool:
        return not self.problems()

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise RequestError(problems[0])

    def asArgList(self) -> List[str]:
        self.validate()
        return self._args() + ["--events", "-"]

    def command(self, python: str) -> List[str]:
        return cli_command(python, self.asArgList())

    def _args(self) -> List[str]:
        raise NotImplementedError

    def _device_problems(self) -> List[str]:
        device = getattr(self, "device")
        return [] if device in DEVICE_CHOICES else [f"device {device!r}: choose one of {', '.join(DEVICE_CHOICES)}"]


@dataclass
class ModelChoice(Request):
    """The model fields of the panel: a family, and the built-in demo model or the user's checkpoint (a file, or a
    preset / shipped name typed by hand)."""

    modelKind: str = "UNETR"
    useDemoModel: bool = True
    checkpointPath: str = ""
    method: str = "lora-pt"
    rank: int = 1
    alpha: float = 0.0  # 0: the method's default (alpha = rank)

    @property
    def model(self) -> str:
        return demo_model(self.modelKind) if self.useDemoModel else str(self.checkpointPath or "")

    @property
    def preset(self) -> str:
        return estimate_preset(self.modelKind, self.model)

    def problems(self) -> List[str]:
        found = self._method_problems()
        model = self.model if self.modelKind in MODEL_KINDS else ""
        if not self.useDemoModel and not model:
            found.append("no checkpoint chosen: choose a checkpoint file, or tick 'Built-in demo model'")
        elif os.path.isdir(model):  # a MONAI bundle (a latent diffusion model's autoencoder and U-Net)
            if not any(os.path.isfile(os.path.join(model, "configs", name)) for name in BUNDLE_CONFIG_NAMES):
                found.append(f"{model}: a folder must be a MONAI bundle (configs/inference.json and models/); choose "
                             "that folder, a checkpoint file, or tick 'Built-in demo model'")
        elif _looks_like_file(model) and not os.path.isfile(model):
            found.append(f"{model}: checkpoint file not found; choose an existing .safetensors/.pt file or tick "
                         "'Built-in demo model'")
        return found

    def _method_problems(self) -> List[str]:
        found = []
        methods = method_summaries()
        if self.modelKind not in MODEL_KINDS:
            found.append(f"model kind {self.modelKind!r}: choose one of {', '.join(MODEL_KINDS)}")
        if self.method not in methods:
            found.append(f"method {self.method!r} is unknown; choose one of: {', '.join(methods)}")
        if int(self.rank) < 1:
            found.append(f"rank {self.rank}: choose a rank of 1 or more")
        if self.alpha is not None and self.alpha < 0:
            found.append(f"alpha {self.alpha}: choose 0 (the default, alpha = rank) or a positive value")
        return found

    def _method_args(self) -> List[str]:
        args = ["--method", self.method, "--rank", str(int(self.rank))]
        return args + (["--alpha", _number(self.alpha)] if self.alpha else [])


@dataclass
class ParameterCountRequest(ModelChoice):
    """``tensorpeft params --json``: trainable and total parameters of the chosen model, method and rank (with no
    checkpoint chosen yet, of the family's paper preset)."""

    def problems(self) -> List[str]:
        return self._method_problems()

    def asArgList(self) -> List[str]:  # a plain JSON answer, no events
        self.validate()
        return self._args()

    @property
    def counted(self) -> str:
        """What ``params --model`` gets: a shipped model, a preset or a checkpoint file as they are; else (no file
        chosen yet) the family's paper preset."""
        from ..models.presets import PRESETS
        from ..models.shipped import SHIPPED_MODELS

        model = self.model
        return model if model in SHIPPED_MODELS or model in PRESETS or os.path.isfile(model) else self.preset

    def _args(self) -> List[str]:
        return ["params", "--model", self.counted, *self._method_args(), "--json"]


@dataclass
class FinetuneRequest(ModelChoice):
    """``tensorpeft finetune``. Zero means "the CLI's default" for learningRate, steps, patchSize, spacing."""

    dataFolder: str = ""  # Decathlon folder (imagesTr/, labelsTr/) or datalist JSON
    adapterFolder: str = ""  # where the adapter is written
    learningRate: float = 0.0
    steps: int = 0
    patchSize: int = 0
    augmentAffine: bool = True
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    evalEvery: int = 0
    checkpointEvery: int = 0
    threads: int = 0
    flip: str = ""  # "": the CLI default (auto: left-right, swapping left and right labels that tell them apart)
    spacing: float = 0.0
    validationData: str = ""
    skullStrip: str = "auto"
    labels: str = ""  # --labels: "17 53", "left=17 right=53", "17+53"; "": every value in the labels

    def label_specs(self) -> List[str]:  # ``labels`` as ``--labels`` entries (spaces or commas between them)
        return str(self.labels or "").replace(",", " ").split()

    def problems(self) -> List[str]:
        found = super().problems() + _skull_strip_problems(self.skullStrip)
        if self.label_specs():  # imported only then: the front end's requests stay numpy-free
            from ..data.labels import LabelSpecError, parse_label_specs
            try:
                parse_label_specs(self.label_specs())
            except LabelSpecError as err:
                found.append(str(err))
        if self.learningRate and not (0 < float(self.learningRate) < 1):
            found.append(f"learning rate {self.learningRate}: choose 0 (the default) or a value between 0 and 1, "
                         "e.g. 0.001")
        if int(self.steps) < 0:
            found.append(f"steps {self.steps}: choose 0 (the default for the number of cases) or more")
        if self.spacing < 0:
            found.append(f"spacing {self.spacing}: choose 0 (the model's working spacing) or a voxel size in mm")
        if self.patchSize and self.patchSize < 16:
            found.append(f"patch size {self.patchSize}: choose 0 (the model's size) or at least 16 voxels")
        found += self._device_problems()
        if not self.dataFolder or not os.path.exists(self.dataFolder):
            found.append(f"{self.dataFolder or '(none)'}: training data not found; choose a Decathlon folder "
                         "(imagesTr/, labelsTr/) or add volume/segmentation pairs from the scene")
        if not self.adapterFolder:
            found.append("no adapter folder: choose where the adapter is written")
        if self.flip and self.flip not in FLIP_CHOICES:
            found.append(f"flip {self.flip!r}: choose auto, all, lr (left-right, for brains) or none")
        return found

    def _args(self) -> List[str]:
        args = ["finetune", "--model", self.model, "--data", self.dataFolder, "--out", self.adapterFolder,
                *self._method_args(), "--device", DEVICE_CHOICES[self.device], "--seed", str(int(self.seed))]
        if not self.resume:  # a resumed run keeps its own
            args += ["--skull-strip", self.skullStrip]
        options = (("--lr", self.learningRate, _number), ("--steps", self.steps, str),
                   ("--spacing", self.spacing, _number), ("--patch-size", self.patchSize, str),
                   ("--val", self.validationData, str), ("--eval-every", self.evalEvery, str),
                   ("--checkpoint-every", self.checkpointEvery, str), ("--threads", self.threads, str),
                   ("--flip", self.flip, str))
        for flag, value, text in options:
            if value:
                args += [flag, text(value)]
        args += ["--labels", *self.label_specs()] if self.label_specs() else []
        if not self.augmentAffine or self.modelKind == "DDPM":  # affine augmentation is for segmentation
            args.append("--no-affine")
        if self.resume:
            args.append("--resume")
        elif self.overwrite:
            args.append("--overwrite")
        return args


@dataclass
class SegmentRequest(Request):
    """``tensorpeft segment`` for one exported image file → one mask file on the image's grid."""

    image: str = ""
    mask: str = ""
    adapterFolder: str = ""
    model: str = ""
    device: str = "auto"
    minComponentMm3: Optional[float] = None
    skullStrip: str = "auto"

    def problems(self) -> List[str]:
        found = self._device_problems() + _skull_strip_problems(self.skullStrip)
        if not self.adapterFolder and not self.model:
            found.append("no adapter folder and no model: fine-tune first, or load an adapter folder")
        if not self.image or not self.mask:
            found.append("no image or no mask file: choose the volume to segment")
        return found

    def _args(self) -> List[str]:
        args = ["segment", "--image", self.image, "--out", self.mask, "--device", DEVICE_CHOICES[self.device],
                "--skull-strip", self.skullStrip]
        args += ["--adapter", self.adapterFolder] if self.adapterFolder else []
        args += ["--model", self.model] if self.model else []
        if self.minComponentMm3 is not None:
            args += ["--min-component", _number(self.minComponentMm3)]
        return args


@dataclass
class SynthesizeRequest(Request):
    """``tensorpeft synthesize``: ``synthCount`` volumes with ``synthSteps`` sampling steps into ``outputFolder``."""

    outputFolder: str = ""
    synthCount: int = 2
    synthSteps: int = 50
    adapterFolder: str = ""
    model: str = ""
    device: str = "auto"
    seed: int = 0

    def problems(self) -> List[str]:
        found = self._device_problems()
        if int(self.synthCount) < 1:
            found.append(f"number of volumes {self.synthCount}: choose 1 or more")
        if int(self.synthSteps) < 1:
            found.append(f"sampling steps {self.synthSteps}: choose 1 or more")
        if not self.adapterFolder and not self.model:
            found.append("no adapter folder and no model: fine-tune first, or load an adapter folder")
        if not self.outputFolder:
            found.append("no output folder for the generated volumes")
        return found

    def _args(self) -> List[str]:
        args = ["synthesize", "--out", self.outputFolder, "--count", str(int(self.synthCount)),
                "--steps", str(int(self.synthSteps)), "--seed", str(int(self.seed)),
                "--device", DEVICE_CHOICES[self.device]]
        args += ["--adapter", self.adapterFolder] if self.adapterFolder else []
        return args + (["--model", self.model] if self.model else [])
