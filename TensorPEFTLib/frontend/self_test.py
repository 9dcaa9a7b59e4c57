"""The Slicer module's self-test steps, on synthetic oblique, anisotropic volumes (the scene and a ``run`` function
that runs a request to its end are arguments, so the steps read the same in Slicer and in scripts)."""

from __future__ import annotations

import os
from typing import Any, Callable, List

from . import synthetic_scene
from .adapter_folders import check_adapter_for
from .requests import FinetuneRequest, SegmentRequest
from .scene import geometry_problems, load_volume_file, write_volume_node


def geometry_round_trip(scene: Any, folder: str) -> List[str]:
    """Scene → file → scene keeps the IJK-to-RAS of an oblique, anisotropic volume: the differences found."""
    volume, segmentation = synthetic_scene.make_synthetic_case(scene)
    copy = load_volume_file(scene, write_volume_node(volume, os.path.join(folder, "volume.nrrd")), "round trip")
    return geometry_problems(volume, copy) + geometry_problems(volume, segmentation)


def finetune_and_segment(scene: Any, folder: str, run: Callable[[Any, str], Any],
                         say: Callable[[str], None] = print) -> Any:
    """Fine-tune 2 CPU steps on two synthetic cases, segment a third volume; returns the segmentation node.
    Raises AssertionError with the worker's message and log tail when a step fails."""
    say("Synthetic training cases and an input volume")
    case = synthetic_scene.prepare_self_test(scene, folder, cases=2)
    say("Fine-tuning 2 steps on the CPU in a worker process")
    adapter = os.path.join(folder, "adapter")
    result = run(FinetuneRequest(useDemoModel=False, checkpointPath="unetr-small", dataFolder=case["train"],
                                 adapterFolder=adapter, method="lora", rank=2, steps=2, device="CPU", evalEvery=2,
                                 checkpointEvery=2), "fine-tune")
    assert result.ok, f"{result.message}\n{result.log[-3000:]}"
    check_adapter_for(adapter, "segmentation")
    say("Segmenting the input volume with the new adapter")
    mask = os.path.join(folder, "mask.nrrd")
    result = run(SegmentRequest(image=case["test_image"], mask=mask, adapterFolder=adapter, device="CPU",
                                minComponentMm3=0), "segment")
    assert result.ok, f"{result.message}\n{result.log[-3000:]}"
    segmentation, problems = synthetic_scene.check_segmentation_result(scene, case["test_volume"], mask)
    assert not problems, problems
    expected = f"{case['test_volume'].GetName()} segmentation"
    assert segmentation.GetName() == expected, f"{segmentation.GetName()!r} != {expected!r}"
    return case["test_volume"], segmentation
