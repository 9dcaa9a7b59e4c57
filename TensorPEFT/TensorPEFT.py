"""TensorPEFT 3D Slicer module: fine-tune a pretrained UNETR / 3D DDPM with a parameter-efficient adapter on a few
labelled scans, segment volumes and synthesize MRIs — without freezing Slicer.

Thin on purpose: training runs in a worker process (``python -m TensorPEFTLib.cli ... --events -``, the same command
a terminal user runs), followed by ``TensorPEFTLib.worker`` (torch-free); every scene operation lives in
``TensorPEFTLib.slicer_io``. This file holds the module metadata, the widget, a small logic and the self-test.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Annotated, Any, Callable, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))


def libraryParent() -> str:
    """The folder holding ``TensorPEFTLib/``: beside this file when installed, one up in a source checkout."""
    for candidate in (_HERE, os.path.dirname(_HERE)):
        if os.path.isfile(os.path.join(candidate, "TensorPEFTLib", "cli.py")):
            return candidate
    return _HERE


if libraryParent() not in sys.path:
    sys.path.insert(0, libraryParent())

from TensorPEFTLib import worker as tpw  # noqa: E402  (torch-free: the panel draws before PyTorch is installed)

DATA_SOURCES = ["Volumes and segmentations in the scene", "Decathlon folder"]
POLL_MS = 200


#
# TensorPEFT
#


class TensorPEFT(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TensorPEFT")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TensorPEFT developers"]
        self.parent.helpText = _(
            "Adapt pretrained 3D models (UNETR segmentation, 3D DDPM synthesis) to your own 5–10 labelled scans with "
            "parameter-efficient adapters (LoRA-PT, tCURLoRA, TenVOO, LoRA ...). Training runs in a separate process: "
            "Slicer stays responsive and Cancel keeps the last checkpoint. "
            "See <a href='https://github.com/tensorpeft/tensorpeft/blob/main/docs/slicer.md'>the documentation</a>.")
        self.parent.acknowledgementText = _(
            "Built on MONAI, PyTorch and 3D Slicer. Methods: LoRA-PT and tCURLoRA (UNETR, hippocampus), TenVOO (3D DDPM).")


#
# Parameter node
#


@parameterNodeWrapper
class TensorPEFTParameterNode:
    modelKind: Annotated[str, Choice(list(tpw.MODEL_KINDS))] = "UNETR"
    useDemoModel: bool = True
    checkpointPath: pathlib.Path
    method: Annotated[str, Choice(list(tpw.METHODS))] = "lora-pt"
    rank: Annotated[int, WithinRange(1, 64)] = 1
    alpha: Annotated[float, WithinRange(0.0, 1024.0)] = 0.0
    learningRate: Annotated[float, WithinRange(0.0, 0.5)] = 0.0  # 0: finetune's default for the method
    steps: Annotated[int, WithinRange(0, 100000)] = 0  # 0: finetune's default for the number of cases
    patchSize: Annotated[int, WithinRange(0, 512)] = 0
    augmentAffine: bool = True  # few scans: learn what a structure looks like, not where it sits in the patch
    dataSource: Annotated[str, Choice(DATA_SOURCES)] = DATA_SOURCES[0]
    dataFolder: pathlib.Path
    device: Annotated[str, Choice(list(tpw.DEVICE_CHOICES))] = "auto"
    adapterFolder: pathlib.Path
    resume: bool = False
    inputVolume: vtkMRMLScalarVolumeNode
    synthCount: Annotated[int, WithinRange(1, 64)] = 2
    synthSteps: Annotated[int, WithinRange(1, 1000)] = 50


def _path(value: Any) -> str:
    """A Path parameter as a string; the unset default ``Path()`` ('.') → ''."""
    text = str(value or "")
    return "" if text in ("", ".") else text


#
# Widget
#


class TensorPEFTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[TensorPEFTLogic] = None
        self._parameterNode: Optional[TensorPEFTParameterNode] = None
        self._parameterNodeGuiTag = None
        self.job: Optional[tpw.WorkerJob] = None  # the one user job: fine-tune, segment or synthesize
        self.countJob: Optional[tpw.WorkerJob] = None
        self.deviceJob: Optional[tpw.WorkerJob] = None
        self.deviceReport: Optional[dict] = None
        self._countKey = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TensorPEFT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TensorPEFTLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.synthesizeButton.connect("clicked(bool)", self.onSynthesizeButton)
        self.ui.saveAdapterButton.connect("clicked(bool)", self.onSaveAdapter)
        self.ui.loadAdapterButton.connect("clicked(bool)", self.onLoadAdapter)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.addPairButton.connect("clicked(bool)", lambda: self.addPairRow())
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePair)
        self.ui.autoPairButton.connect("clicked(bool)", self.onAutoPair)
        self.ui.pairsTable.setHorizontalHeaderLabels([_("Volume"), _("Segmentation")])

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MS)
        self.pollTimer.connect("timeout()", self.onPoll)
        self.countTimer = qt.QTimer()
        self.countTimer.setSingleShot(True)
        self.countTimer.setInterval(600)  # debounce: count once the user stops changing rank/method
        self.countTimer.connect("timeout()", self.updateParameterCount)

        self.initializeParameterNode()
        self.refreshDependencyStatus()
        self.refreshDevice()

    def cleanup(self) -> None:
        """Module closed (Slicer exits): stop the worker politely — it checkpoints — and kill the background probes."""
        if self.job is not None and self.job.running:
            self.job.cancel()
        for job in (self.countJob, self.deviceJob):
            if job is not None and job.running:
                job.process.kill_tree()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.ui.pairsTable.setRowCount(0)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[TensorPEFTParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            for index, name in enumerate(tpw.METHODS):  # the Choice connector filled the combo box; add the help
                self.ui.methodComboBox.setItemData(index, tpw.METHODS[name], qt.Qt.ToolTipRole)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self.onParameterChanged()

    # ------------------------------------------------------------------ panel state
    def onParameterChanged(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.ui.methodDescriptionLabel.text = tpw.METHODS.get(p.method, "")
        self.ui.checkpointPathLineEdit.enabled = not p.useDemoModel
        scene = p.dataSource == DATA_SOURCES[0]
        for widget in (self.ui.pairsTable, self.ui.addPairButton, self.ui.removePairButton, self.ui.autoPairButton,
                       self.ui.pairsStatusLabel):
            widget.visible = scene
        self.ui.dataFolderPathLineEdit.visible = not scene
        self.ui.dataFolderLabel.visible = not scene
        self.ui.segmentCollapsibleButton.enabled = p.modelKind == "UNETR"
        self.ui.synthesizeCollapsibleButton.enabled = p.modelKind == "DDPM"
        self.ui.dataCollapsibleButton.text = _("Training data") if p.modelKind == "UNETR" else _("Training data (volumes; labels unused)")
        key = (p.modelKind, p.useDemoModel, _path(p.checkpointPath), p.method, p.rank, p.alpha)
        if key != self._countKey:
            self._countKey = key
            self.ui.parameterCountLabel.text = _("counting ...")
            self.countTimer.start()
        self.updateDeviceLabels()
        self.updatePairsStatus()
        self.updateButtons()

    def updateButtons(self) -> None:
        busy = self.job is not None and self.job.running
        kind = self.job.name if busy else None
        self.ui.finetuneButton.text = _("Cancel") if kind == "fine-tune" else _("Fine-tune")
        self.ui.segmentButton.text = _("Cancel") if kind == "segment" else _("Segment")
        self.ui.synthesizeButton.text = _("Cancel") if kind == "synthesize" else _("Synthesize")
        self.ui.finetuneButton.enabled = kind in (None, "fine-tune")
        self.ui.segmentButton.enabled = kind in (None, "segment")
        self.ui.synthesizeButton.enabled = kind in (None, "synthesize")
        for widget in (self.ui.saveAdapterButton, self.ui.loadAdapterButton, self.ui.installDependenciesButton):
            widget.enabled = not busy

    def modelSource(self) -> str:
        p = self._parameterNode
        if p.useDemoModel:
            return tpw.DEMO_MODELS[p.modelKind]
        path = _path(p.checkpointPath)
        if not path:
            raise tpw.WorkerError("no checkpoint chosen: choose a checkpoint file, or tick 'Built-in demo model'")
        return path

    # ------------------------------------------------------------------ training pairs
    def addPairRow(self, volume=None, segmentation=None) -> None:
        row = self.ui.pairsTable.rowCount
        self.ui.pairsTable.insertRow(row)
        for column, (types, node) in enumerate(((["vtkMRMLScalarVolumeNode"], volume),
                                                (["vtkMRMLSegmentationNode"], segmentation))):
            combo = slicer.qMRMLNodeComboBox()
            combo.nodeTypes = types
            combo.showChildNodeTypes = False
            combo.addEnabled = combo.removeEnabled = False
            combo.noneEnabled = True
            combo.setMRMLScene(slicer.mrmlScene)
            combo.setCurrentNode(node)
            combo.connect("currentNodeChanged(vtkMRMLNode*)", lambda *_: self.updatePairsStatus())
            self.ui.pairsTable.setCellWidget(row, column, combo)
        self.updatePairsStatus()

    def onRemovePair(self) -> None:
        row = self.ui.pairsTable.currentRow()
        self.ui.pairsTable.removeRow(row if row >= 0 else self.ui.pairsTable.rowCount - 1)
        self.updatePairsStatus()

    def onAutoPair(self) -> None:
        from TensorPEFTLib import slicer_io

        self.ui.pairsTable.setRowCount(0)
        for volume, segmentation in slicer_io.find_training_pairs(slicer.mrmlScene):
            self.addPairRow(volume, segmentation)
        if self.ui.pairsTable.rowCount == 0:
            slicer.util.warningDisplay(_("No segmentation in the scene could be paired with a volume. Name each "
                                         "segmentation after its volume (e.g. 'case1' and 'case1 label') or add rows by hand."))

    def trainingPairs(self) -> list:
        pairs = []
        for row in range(self.ui.pairsTable.rowCount):
            volume = self.ui.pairsTable.cellWidget(row, 0).currentNode()
            segmentation = self.ui.pairsTable.cellWidget(row, 1).currentNode()
            if volume is not None or segmentation is not None:
                pairs.append((volume, segmentation))
        return pairs

    def updatePairsStatus(self) -> None:
        labels = self._parameterNode is None or self._parameterNode.modelKind == "UNETR"  # DDPM: volumes only
        n = len([(v, s) for v, s in self.trainingPairs() if v is not None and (s is not None or not labels)])
        advice = _(" (5–10 are recommended)") if n < 5 else ""
        self.ui.pairsStatusLabel.text = _("{n} complete pair(s){advice}").format(n=n, advice=advice)

    # ------------------------------------------------------------------ device, counts, dependencies
    def refreshDevice(self) -> None:
        if self.logic.missingDependencies():
            self.ui.deviceInfoLabel.text = _("install the dependencies to detect the GPU")
            return
        self.deviceJob = self.logic.startJob(["-m", "TensorPEFTLib.worker", "device"], name="device check",
                                             raw=True, on_finished=self.onDeviceReport)
        self.pollTimer.start()

    def onDeviceReport(self, result: tpw.JobResult) -> None:
        try:
            self.deviceReport = json.loads(self.deviceJob.stdout_lines[-1]) if result.ok else {"error": result.message}
        except (IndexError, ValueError):
            self.deviceReport = {"error": _("could not read the device report; see the log")}
        self.updateDeviceLabels()

    def updateDeviceLabels(self) -> None:
        p = self._parameterNode
        if p is None or self.deviceReport is None:
            return
        text, on_cpu = tpw.describe_device(self.deviceReport, p.device)
        self.ui.deviceInfoLabel.text = text
        warning = ""
        if on_cpu:
            preset = tpw.count_preset(p.modelKind, tpw.DEMO_MODELS[p.modelKind] if p.useDemoModel else _path(p.checkpointPath))
            warning = tpw.cpu_warning(preset, p.steps or 1000, p.patchSize or None)  # 0: finetune's default 1000
        self.ui.cpuWarningLabel.text = warning
        self.ui.cpuWarningLabel.visible = bool(warning)

    def updateParameterCount(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        if self.countJob is not None and self.countJob.running:
            self.countJob.process.kill_tree()  # a newer question replaces it
        if self.logic.missingDependencies():
            self.ui.parameterCountLabel.text = _("install the dependencies to count parameters")
            return
        source = tpw.DEMO_MODELS[p.modelKind] if p.useDemoModel else _path(p.checkpointPath)
        # `tensorpeft params` counts a shipped model, a preset or the user's own checkpoint file as it is
        preset = source if source and (source in tpw.DEMO_PRESETS or os.path.isfile(source)) else tpw.count_preset(p.modelKind, source)
        args = tpw.params_args(preset, p.method, p.rank, p.alpha or None)
        self.countJob = self.logic.startJob(args, name="parameter count",
                                            on_finished=lambda result, preset=preset: self.onParameterCount(result, preset))
        self.pollTimer.start()

    def onParameterCount(self, result: tpw.JobResult, preset: str) -> None:
        if result.status == "cancelled" or self.countJob is None or self.countJob.result is not result:
            return
        if not result.ok:
            self.ui.parameterCountLabel.text = result.message.replace("parameter count failed: ", "")
            return
        try:
            report = json.loads(self.countJob.stdout_text())
        except ValueError:
            self.ui.parameterCountLabel.text = _("could not read the count; see the log")
            return
        self.ui.parameterCountLabel.text = _("{trainable:,} of {total:,} parameters ({percent:.2f}%) on {preset}; "
                                             "adapter {adapter:,}").format(
            trainable=report["trainable"], total=report["base_total"], percent=report["trainable_percent"],
            preset=preset, adapter=report["adapter"])

    def refreshDependencyStatus(self) -> None:
        missing = self.logic.missingDependencies()
        self.ui.dependencyStatusLabel.text = (_("Missing: {names}").format(names=", ".join(missing)) if missing
                                              else _("All dependencies are installed."))
        if missing:
            self.ui.dependenciesCollapsibleButton.collapsed = False

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed."), waitCursor=True):
            self.logic.installDependencies()
        self.refreshDependencyStatus()
        self.refreshDevice()
        self._countKey = None
        self.onParameterChanged()

    def ensureDependencies(self) -> bool:
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                _("TensorPEFT needs: {names}. Install them now?").format(names=", ".join(missing))):
            return False
        self.onInstallDependencies()
        return not self.logic.missingDependencies()

    # ------------------------------------------------------------------ jobs
    def onPoll(self) -> None:
        running = False
        for job in (self.job, self.countJob, self.deviceJob):
            if job is not None and job.running:
                running = job.poll() or running
        if not running:
            self.pollTimer.stop()

    def startUserJob(self, args: list, name: str, onSuccess: Callable[[tpw.JobResult], None]) -> None:
        self.ui.logTextEdit.appendPlainText(f"$ tensorpeft {' '.join(args)}")
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("starting the worker (loading torch and the model) ...")

        def finished(result: tpw.JobResult) -> None:
            self.updateButtons()
            self.ui.statusLabel.text = result.message if not result.ok else f"{self.job.progress.text()}"
            if result.ok:
                self.ui.progressBar.value = 1000
                with slicer.util.tryWithErrorDisplay(_("Loading the result into the scene failed."), waitCursor=True):
                    onSuccess(result)
            elif result.status == "cancelled":
                slicer.util.infoDisplay(result.message)
            else:
                slicer.util.errorDisplay(result.message, detailedText=result.log[-20000:])
                self.ui.dependenciesCollapsibleButton.collapsed = False  # the log is in that section

        self.job = self.logic.startJob(args, name=name, on_progress=self.onProgress,
                                       on_log=self.ui.logTextEdit.appendPlainText, on_finished=finished)
        self.pollTimer.start()
        self.updateButtons()

    def onProgress(self, progress: tpw.Progress) -> None:
        self.ui.progressBar.value = int(round(progress.fraction * 1000))
        self.ui.statusLabel.text = progress.text()

    def cancelIfRunning(self, name: str) -> bool:
        if self.job is not None and self.job.running:
            if self.job.name == name:
                self.job.cancel()
                self.ui.statusLabel.text = _("stopping after the current step (a checkpoint is written) ...")
            return True
        return False

    # ------------------------------------------------------------------ buttons
    def onFinetuneButton(self) -> None:
        if self.cancelIfRunning("fine-tune"):
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start fine-tuning."), waitCursor=True):
            if not self.ensureDependencies():
                return
            p = self._parameterNode
            out = _path(p.adapterFolder) or self.logic.newRunFolder(p.modelKind, p.method, p.rank)
            overwrite = False
            # a finished run (its adapter) or a cancelled one (only its checkpoint: the adapter is written at the end)
            earlier = os.path.isfile(os.path.join(out, "adapter_config.json")) or os.path.isdir(os.path.join(out, "checkpoint"))
            if not p.resume and earlier:
                if not slicer.util.confirmOkCancelDisplay(_("{out} already holds a fine-tuning run. Replace it? "
                                                            "(Tick Resume to continue it instead.)").format(out=out)):
                    return
                overwrite = True
            if p.dataSource == DATA_SOURCES[0]:
                data = self.logic.exportTrainingPairs(self.trainingPairs(), withLabels=p.modelKind == "UNETR")
            else:
                data = _path(p.dataFolder)
            request = tpw.FinetuneRequest(model=self.modelSource(), data=data, out=out, method=p.method, rank=p.rank,
                                          alpha=p.alpha or None, lr=p.learningRate or None, steps=p.steps or None,
                                          patch_size=p.patchSize or None, device=p.device, resume=p.resume,
                                          overwrite=overwrite,
                                          affine=p.augmentAffine and p.modelKind == "UNETR")
            args = tpw.finetune_args(request)
            p.adapterFolder = pathlib.Path(out)
            self.startUserJob(args, "fine-tune", onSuccess=lambda result: self.onFinetuneDone(result, out))

    def onFinetuneDone(self, result: tpw.JobResult, out: str) -> None:
        best = (result.done or {}).get("best")
        score = _(", best validation {best:.3f}").format(best=best) if best is not None else ""
        self.ui.statusLabel.text = _("adapter written to {out}{score}").format(out=out, score=score)

    def onSegmentButton(self) -> None:
        if self.cancelIfRunning("segment"):
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start segmentation."), waitCursor=True):
            if not self.ensureDependencies():
                return
            p = self._parameterNode
            volume = p.inputVolume
            adapter = self.logic.checkAdapter(_path(p.adapterFolder), "segmentation")
            image, mask = self.logic.exportForSegmentation(volume)
            args = tpw.segment_args(image, mask, adapter=adapter, device=p.device)
            name = f"{volume.GetName()} segmentation"
            segmentName = os.path.basename(os.path.normpath(adapter))
            self.startUserJob(args, "segment", onSuccess=lambda result: self.logic.showSegmentation(
                volume, self.logic.importMask(mask, volume, name, segmentName)))

    def onSynthesizeButton(self) -> None:
        if self.cancelIfRunning("synthesize"):
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start synthesis."), waitCursor=True):
            if not self.ensureDependencies():
                return
            p = self._parameterNode
            adapter = self.logic.checkAdapter(_path(p.adapterFolder), "synthesis")
            out = self.logic.newWorkFolder("synthesized")
            args = tpw.synthesize_args(out, p.synthCount, adapter=adapter, device=p.device, steps=p.synthSteps)
            self.startUserJob(args, "synthesize", onSuccess=lambda result: self.logic.showVolumes(
                self.logic.importSynthesized((result.done or {}).get("volumes") or [])))

    def onSaveAdapter(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Saving the adapter failed."), waitCursor=True):
            source = _path(self._parameterNode.adapterFolder)
            tpw.check_adapter_folder(source)
            target = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Save adapter to folder"))
            if target:
                copied = tpw.copy_adapter(source, target)
                self.ui.statusLabel.text = _("saved {files} to {target}").format(files=", ".join(copied), target=target)

    def onLoadAdapter(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Loading the adapter failed."), waitCursor=True):
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose an adapter folder"))
            if not folder:
                return
            config = tpw.check_adapter_folder(folder)
            p = self._parameterNode
            p.adapterFolder = pathlib.Path(folder)
            p.modelKind = "DDPM" if config.get("family") == "ddpm" or config.get("task") == "synthesis" else "UNETR"
            self.ui.statusLabel.text = _("adapter {method} (rank {rank}) loaded from {folder}").format(
                method=config.get("method", "?"), rank=config.get("rank", "?"), folder=folder)


#
# Logic
#


class TensorPEFTLogic(ScriptedLoadableModuleLogic):
    """Starts workers, moves data between the scene and files (through TensorPEFTLib.slicer_io), installs deps."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.requirementsPath = os.path.join(_HERE, "Resources", "requirements.txt")

    def getParameterNode(self):
        return TensorPEFTParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ processes
    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's own Python launcher (PythonSlicer), so the worker sees the same packages and PyTorch build.
        Never ``sys.executable`` inside the application: that can be the Slicer binary itself."""
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        candidates = [shutil.which(name), os.path.join(slicer.app.slicerHome, "bin", name),
                      os.path.join(os.path.dirname(sys.executable), name)]
        for candidate in candidates:
            if candidate and os.path.isfile(candidate):
                return candidate
        if os.path.basename(sys.executable).lower().startswith("python"):
            return sys.executable
        raise tpw.WorkerError(f"{name} not found next to Slicer ({slicer.app.slicerHome}); reinstall Slicer")

    def startJob(self, args: list, name: str, raw: bool = False, process=None, **callbacks) -> tpw.WorkerJob:
        """Start ``tensorpeft ARGS`` (or ``python ARGS`` with ``raw``) in a worker process; poll the returned job."""
        argv = [self.pythonExecutable(), *args] if raw else tpw.cli_command(self.pythonExecutable(), args)
        job = tpw.WorkerJob(argv, name=name, process=process, env=tpw.worker_environment(libraryParent()),
                            cwd=self.workRoot(), **callbacks)
        job.start()
        return job

    def runBlocking(self, args: list, name: str, timeout: float = 1800.0) -> tpw.JobResult:
        """Run a job to its end while keeping Slicer's event loop alive (self-test, scripts)."""
        job = self.startJob(args, name)
        deadline = time.monotonic() + timeout
        while job.poll():
            if time.monotonic() > deadline:
                job.cancel()
                deadline = time.monotonic() + job.grace_seconds + 5
            slicer.app.processEvents()
            time.sleep(0.05)
        return job.result

    # ------------------------------------------------------------------ folders
    @staticmethod
    def workRoot() -> str:
        root = os.path.join(slicer.app.temporaryPath, "TensorPEFT")
        os.makedirs(root, exist_ok=True)
        return root

    def newWorkFolder(self, kind: str) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return tempfile.mkdtemp(prefix=f"{kind}-{stamp}-", dir=self.workRoot())

    def newRunFolder(self, modelKind: str, method: str, rank: int) -> str:
        return os.path.join(self.newWorkFolder("runs"), f"{modelKind.lower()}-{method}-r{rank}")

    # ------------------------------------------------------------------ scene ↔ files
    def exportTrainingPairs(self, pairs: list, withLabels: bool = True) -> str:
        from TensorPEFTLib import slicer_io

        folder = self.newWorkFolder("training-data")
        slicer_io.export_training_folder(slicer.mrmlScene, pairs, folder, with_labels=withLabels)
        return folder

    def exportForSegmentation(self, volume) -> tuple:
        from TensorPEFTLib import slicer_io

        folder = self.newWorkFolder("segment")
        name = slicer_io.safe_name(volume.GetName() if volume else "", "volume")
        image = slicer_io.write_volume_node(volume, os.path.join(folder, name + slicer_io.EXCHANGE_SUFFIX))
        return image, os.path.join(folder, name + "_mask" + slicer_io.EXCHANGE_SUFFIX)

    def importMask(self, mask: str, volume, name: str, segmentName: str):
        from TensorPEFTLib import slicer_io

        segmentation = slicer_io.load_mask_file(slicer.mrmlScene, mask, volume, name=name, segment_names={1: segmentName})
        if segmentation.GetSegmentation().GetNumberOfSegments() == 0:
            slicer.util.warningDisplay(_("The model found nothing in {volume}: the segmentation is empty. Check that "
                                         "the image resembles the training scans (modality, orientation, field of view).")
                                       .format(volume=volume.GetName()))
        return segmentation

    def importSynthesized(self, paths: list) -> list:
        from TensorPEFTLib import slicer_io

        if not paths:
            raise tpw.WorkerError("the worker reported no generated volumes; see the log")
        return slicer_io.load_synthesized_volumes(slicer.mrmlScene, paths)

    @staticmethod
    def checkAdapter(folder: str, task: str) -> str:
        config = tpw.check_adapter_folder(folder)
        saved = config.get("task") or {"unetr": "segmentation", "ddpm": "synthesis"}.get(config.get("family"))
        if saved and saved != task:
            need = "UNETR" if task == "segmentation" else "DDPM"
            raise tpw.WorkerError(f"{folder} holds a {saved} adapter; {task} needs a {need} adapter — fine-tune one "
                                  "or load another folder")
        return folder

    # ------------------------------------------------------------------ display
    @staticmethod
    def showSegmentation(volume, segmentation) -> None:
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        display = segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetVisibility3D(True)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDViewCount > 0:
            view = layoutManager.threeDWidget(0).threeDView()
            view.resetFocalPoint()
            view.resetCamera()
        bounds = [0.0] * 6
        segmentation.GetRASBounds(bounds)
        if bounds[0] <= bounds[1]:  # centre the slice views on the segmented structure
            centre = [(bounds[2 * a] + bounds[2 * a + 1]) / 2 for a in range(3)]
            slicer.modules.markups.logic().JumpSlicesToLocation(*centre, True)

    @staticmethod
    def showVolumes(nodes: list) -> None:
        if nodes:
            slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)

    # ------------------------------------------------------------------ dependencies
    def missingDependencies(self) -> list:
        missing = [] if importlib.util.find_spec("torch") is not None else ["torch (PyTorch extension)"]
        return missing + tpw.missing_requirements(tpw.read_requirements(self.requirementsPath))

    def installDependencies(self) -> None:
        """On the main thread: torch through Slicer's PyTorch extension, the rest with pip, never replacing what
        Slicer ships (numpy, SimpleITK) or the installed torch (a constraints file pins them)."""
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                raise tpw.WorkerError("the PyTorch extension is not installed: install 'PyTorch' from the Extensions "
                                      "Manager, restart Slicer, then click 'Install dependencies' again") from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=">=2.2")
            if torch is None:
                raise tpw.WorkerError("PyTorch installation was cancelled; TensorPEFT cannot run without it")
        requirements = tpw.missing_requirements(tpw.read_requirements(self.requirementsPath))
        if not requirements:
            return
        constraints = os.path.join(self.workRoot(), "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as handle:
            handle.write("\n".join(tpw.shipped_constraints()) + "\n")
        packaging = _slicerPackaging()
        if packaging is not None:
            packaging.pip_ensure(requirements, constraints=constraints, requester="TensorPEFT")
        else:
            slicer.util.pip_install(" ".join([f'-c "{constraints}"'] + [f'"{r}"' for r in requirements]))
        importlib.invalidate_caches()


def _slicerPackaging():
    """``slicer.packaging`` (Slicer ≥ 5.12) or ``slicer.pydeps`` (5.11) when it offers pip_ensure, else None."""
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "pip_ensure"):
            return module
    return None


#
# Self-test (runs inside Slicer: Reload and Test, or ctest)
#


class TensorPEFTTest(ScriptedLoadableModuleTest):
    """A tiny CPU fine-tune and segmentation on synthetic oblique, anisotropic volumes, checking the geometry."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_geometry_round_trip()
        self.setUp()
        self.test_finetune_and_segment()

    def test_geometry_round_trip(self):
        from TensorPEFTLib import slicer_io

        self.delayDisplay("Scene → file → scene keeps the IJK-to-RAS of an oblique, anisotropic volume")
        folder = tempfile.mkdtemp(prefix="tensorpeft-selftest-")
        volume, segmentation = slicer_io.make_synthetic_case(slicer.mrmlScene)
        path = slicer_io.write_volume_node(volume, os.path.join(folder, "volume.nrrd"))
        copy = slicer_io.load_volume_file(slicer.mrmlScene, path, "round trip")
        self.assertEqual(slicer_io.geometry_problems(volume, copy), [])
        self.assertEqual(slicer_io.geometry_problems(volume, segmentation), [])
        shutil.rmtree(folder, ignore_errors=True)

    def test_finetune_and_segment(self):
        from TensorPEFTLib import slicer_io

        logic = TensorPEFTLogic()
        missing = logic.missingDependencies()
        self.assertEqual(missing, [], f"install the dependencies first (TensorPEFT panel → Install dependencies): {missing}")
        folder = tempfile.mkdtemp(prefix="tensorpeft-selftest-")
        self.delayDisplay("Synthetic training cases and an input volume")
        case = slicer_io.prepare_self_test(slicer.mrmlScene, folder, cases=2)

        self.delayDisplay("Fine-tuning 2 steps on the CPU in a worker process")
        adapter = os.path.join(folder, "adapter")
        request = tpw.FinetuneRequest(model="unetr-small", data=case["train"], out=adapter, method="lora", rank=2,
                                      steps=2, device="CPU", eval_every=2, checkpoint_every=2)
        result = logic.runBlocking(tpw.finetune_args(request), "fine-tune")
        self.assertTrue(result.ok, f"{result.message}\n{result.log[-3000:]}")
        self.assertEqual(tpw.check_adapter_folder(adapter)["format"], "tensorpeft-adapter")

        self.delayDisplay("Segmenting the input volume with the new adapter")
        mask = os.path.join(folder, "mask.nrrd")
        result = logic.runBlocking(tpw.segment_args(case["test_image"], mask, adapter=adapter, device="CPU",
                                                    min_component_mm3=0), "segment")
        self.assertTrue(result.ok, f"{result.message}\n{result.log[-3000:]}")
        segmentation, problems = slicer_io.check_segmentation_result(slicer.mrmlScene, case["test_volume"], mask)
        self.assertEqual(problems, [])
        self.assertEqual(segmentation.GetName(), f"{case['test_volume'].GetName()} segmentation")
        logic.showSegmentation(case["test_volume"], segmentation)
        shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")
