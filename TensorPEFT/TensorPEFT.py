"""TensorPEFT 3D Slicer module: fine-tune a pretrained UNETR / 3D DDPM with a parameter-efficient adapter on a few
labelled scans, segment volumes and synthesize MRIs — without freezing Slicer.

Only widget wiring, as in Slicer's template; the rest is the torch-free front-end layer ``TensorPEFTLib.frontend``.
Python 3.9 (Slicer 5.8) to 3.12 (5.10+): no newer syntax here or in the front-end package (a test checks both).
"""

import os
import shutil
import sys
import tempfile
from typing import Annotated, Callable, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _, translate
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

# torch-free: the panel draws before PyTorch is installed
from TensorPEFTLib.frontend import (adapter_folders, environment, jobs, requests,  # noqa: E402
                                    slicer_app, slicer_setup, slicer_widgets)
from TensorPEFTLib.frontend.probes import BackgroundProbes  # noqa: E402

DATA_SOURCES = ["Volumes and segmentations in the scene", "Decathlon folder"]
METHODS = requests.method_summaries()
POLL_MS = 200


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


@parameterNodeWrapper
class TensorPEFTParameterNode:
    """The panel's state. The requests of ``TensorPEFTLib.frontend.requests`` use these names."""

    modelKind: Annotated[str, Choice(list(requests.MODEL_KINDS))] = "UNETR"
    useDemoModel: bool = True
    checkpointPath: str = ""
    method: Annotated[str, Choice(list(METHODS))] = "lora-pt"
    rank: Annotated[int, WithinRange(1, 64)] = 1
    alpha: Annotated[float, WithinRange(0.0, 1024.0)] = 0.0  # 0: the method's default
    learningRate: Annotated[float, WithinRange(0.0, 0.5)] = 0.0  # 0: finetune's default for the method
    steps: Annotated[int, WithinRange(0, 100000)] = 0  # 0: finetune's default for the number of cases
    patchSize: Annotated[int, WithinRange(0, 512)] = 0
    augmentAffine: bool = True  # few scans: learn what a structure looks like, not where it sits in the patch
    dataSource: Annotated[str, Choice(DATA_SOURCES)] = DATA_SOURCES[0]
    dataFolder: str = ""
    skullStrip: Annotated[str, Choice(list(requests.SKULL_STRIP_CHOICES))] = "auto"  # whole-head scans, both jobs
    device: Annotated[str, Choice(list(requests.DEVICE_CHOICES))] = "auto"
    adapterFolder: str = ""
    resume: bool = False
    inputVolume: vtkMRMLScalarVolumeNode
    synthCount: Annotated[int, WithinRange(1, 64)] = 2
    synthSteps: Annotated[int, WithinRange(1, 1000)] = 50


class TensorPEFTWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[TensorPEFTLogic] = None
        self._parameterNode: Optional[TensorPEFTParameterNode] = None
        self._parameterNodeGuiTag = None
        self.job: Optional[jobs.WorkerJob] = None  # the one user job: fine-tune, segment or synthesize

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TensorPEFT.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TensorPEFTLogic()
        self.probes = BackgroundProbes(self.logic.startJob, self.showDevice,
                                       lambda text: setattr(self.ui.parameterCountLabel, "text", text))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for button, slot in ((self.ui.finetuneButton, self.onFinetuneButton), (self.ui.segmentButton, self.onSegmentButton),
                             (self.ui.synthesizeButton, self.onSynthesizeButton), (self.ui.saveAdapterButton, self.onSaveAdapter),
                             (self.ui.loadAdapterButton, self.onLoadAdapter), (self.ui.autoPairButton, self.onAutoPair),
                             (self.ui.bundleFolderButton, self.onChooseBundleFolder),
                             (self.ui.installDependenciesButton, self.onInstallDependencies),
                             (self.ui.removePairButton, lambda: self.pairsTable.removeCurrentRow()),
                             (self.ui.addPairButton, lambda: self.pairsTable.addRow())):
            button.connect("clicked(bool)", slot)
        self.pollTimer = slicer_widgets.timer(POLL_MS, self.onPoll)
        self.refreshTimer = slicer_widgets.timer(600, self.refreshEstimates, singleShot=True)  # once the user stops typing
        self.pairsTable = slicer_widgets.TrainingPairsTable(self.ui.pairsTable, self.ui.pairsStatusLabel, slicer.mrmlScene,
                                                            onChanged=self._scheduleRefresh)  # structures: estimates
        self.initializeParameterNode()
        self.refreshDependencyStatus()

    def cleanup(self) -> None:
        """Module closed (Slicer exits): stop the worker politely — it checkpoints — and kill the background probes."""
        if self.job is not None and self.job.running:
            self.job.cancel()
        self.probes.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

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

    def setParameterNode(self, parameterNode: Optional[TensorPEFTParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._scheduleRefresh)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            for index, name in enumerate(METHODS):  # the Choice connector filled the combo box; add the help
                self.ui.methodComboBox.setItemData(index, METHODS[name], qt.Qt.ToolTipRole)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._scheduleRefresh)
            self._checkCanApply()
            self._scheduleRefresh()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """Enable and show what the current parameters allow; nothing else (labels wait for refreshEstimates)."""
        p = self._parameterNode
        if p is None:
            return
        busy = self.job.name if self.job is not None and self.job.running else None
        modelProblems = requests.ModelChoice.fromParameters(p).problems()
        ready = {"fine-tune": not modelProblems, "segment": bool(p.inputVolume and p.adapterFolder),
                 "synthesize": bool(p.adapterFolder)}
        for name, button, label in (("fine-tune", self.ui.finetuneButton, _("Fine-tune")),
                                    ("segment", self.ui.segmentButton, _("Segment")),
                                    ("synthesize", self.ui.synthesizeButton, _("Synthesize"))):
            button.text = _("Cancel") if busy == name else label
            button.enabled = busy == name or (busy is None and ready[name])
        self.ui.finetuneButton.toolTip = modelProblems[0] if modelProblems else ""
        for widget in (self.ui.saveAdapterButton, self.ui.loadAdapterButton, self.ui.installDependenciesButton):
            widget.enabled = busy is None
        self.ui.checkpointPathLineEdit.enabled = self.ui.bundleFolderButton.enabled = not p.useDemoModel
        scene = p.dataSource == DATA_SOURCES[0]
        for widget in (self.ui.pairsTable, self.ui.addPairButton, self.ui.removePairButton, self.ui.autoPairButton,
                       self.ui.pairsStatusLabel):
            widget.visible = scene
        self.ui.dataFolderPathLineEdit.visible = self.ui.dataFolderLabel.visible = not scene
        self.ui.segmentCollapsibleButton.enabled = p.modelKind == "UNETR"
        self.ui.synthesizeCollapsibleButton.enabled = p.modelKind == "DDPM"

    def _scheduleRefresh(self, caller=None, event=None) -> None:
        self.refreshTimer.start()

    def refreshEstimates(self) -> None:
        """Labels that depend on the parameters: method help, parameter count (a worker), device and CPU time."""
        p = self._parameterNode
        if p is None:
            return
        self.ui.methodDescriptionLabel.text = METHODS.get(p.method, "")
        self.ui.learningRateSpinBox.specialValueText = _("auto ({lr:g})").format(lr=requests.default_learning_rate(p.modelKind, p.method))
        self.ui.dataCollapsibleButton.text = _("Training data") if p.modelKind == "UNETR" else _("Training data (volumes; labels unused)")
        self.pairsTable.labels = p.modelKind == "UNETR"  # DDPM: volumes only
        structures = self.pairsTable.updateStatus()  # the status line and the time estimate count the same ones
        if self.logic.missingDependencies():
            self.ui.parameterCountLabel.text = _("install the dependencies to count parameters")
            return
        self.probes.describe(requests.ModelChoice.fromParameters(p), p.device, p.steps, p.patchSize,
                             structures if p.dataSource == DATA_SOURCES[0] else 1)
        self.probes.count(requests.ParameterCountRequest.fromParameters(p))
        self.pollTimer.start()

    def onAutoPair(self) -> None:
        if self.pairsTable.fillFromScene() == 0:
            slicer.util.warningDisplay(_("No segmentation in the scene could be paired with a volume. Name each "
                                         "segmentation after its volume (e.g. 'case1' and 'case1 label') or add rows by hand."))

    # ------------------------------------------------------------------ device, counts, dependencies
    def showDevice(self, text: str, cpuWarning: str) -> None:
        self.ui.deviceInfoLabel.text = text
        self.ui.cpuWarningLabel.text = cpuWarning
        self.ui.cpuWarningLabel.visible = bool(cpuWarning)

    def refreshDependencyStatus(self) -> None:
        missing = self.logic.missingDependencies()
        self.ui.dependencyStatusLabel.text = (_("Missing: {names}").format(names=", ".join(missing)) if missing
                                              else _("All dependencies are installed."))
        if missing:
            self.ui.dependenciesCollapsibleButton.collapsed = False
            self.ui.deviceInfoLabel.text = _("install the dependencies to detect the GPU")

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed."), waitCursor=True):
            self.installDependencies()

    def installDependencies(self) -> None:
        """Install, then refresh what depends on it; errors go to the caller's one error display."""
        try:
            self.logic.installDependencies()
        finally:
            self.probes.forget_device()
            self.refreshDependencyStatus()
            self._scheduleRefresh()

    def ensureDependencies(self) -> bool:
        missing = self.logic.missingDependencies()
        if missing and slicer.util.confirmOkCancelDisplay(
                _("TensorPEFT needs: {names}. Install them now?").format(names=", ".join(missing))):
            self.installDependencies()  # raises into the button's own tryWithErrorDisplay: one dialog
        return not self.logic.missingDependencies()

    # ------------------------------------------------------------------ jobs
    def onPoll(self) -> None:
        running = self.job is not None and self.job.running and self.job.poll()
        if not (self.probes.poll() or running):
            self.pollTimer.stop()

    def startUserJob(self, request: requests.Request, name: str, onSuccess: Callable[[jobs.JobResult], None]) -> None:
        args = request.asArgList()
        self.ui.logTextEdit.appendPlainText(f"$ tensorpeft {' '.join(args)}")
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("starting the worker (loading torch and the model) ...")

        def finished(result: jobs.JobResult) -> None:
            self._checkCanApply()
            self.ui.statusLabel.text = result.message if not result.ok else self.job.progress.text()
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
        self._checkCanApply()

    def onProgress(self, progress) -> None:
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
    def runButton(self, name: str, failure: str, prepare: Callable) -> None:
        """A job button: Cancel while its job runs; else dependencies, then ``prepare(parameters)`` → (request,
        what to do with the result), all under one error display."""
        if self.cancelIfRunning(name):
            return
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            if self.ensureDependencies():
                prepared = prepare(self._parameterNode)
                if prepared is not None:
                    self.startUserJob(prepared[0], name, onSuccess=prepared[1])

    def onFinetuneButton(self) -> None:
        self.runButton("fine-tune", _("Cannot start fine-tuning."), self.prepareFinetune)

    def prepareFinetune(self, p):
        out = p.adapterFolder or os.path.join(self.logic.newWorkFolder("runs"), f"{p.modelKind.lower()}-{p.method}-r{p.rank}")
        earlier = adapter_folders.holds_a_run(out)
        if earlier and not p.resume and not slicer.util.confirmOkCancelDisplay(
                _("{out} already holds a fine-tuning run. Replace it? (Tick Resume to continue it instead.)").format(out=out)):
            return None
        data = (self.logic.exportTrainingPairs(self.pairsTable.pairs(), withLabels=p.modelKind == "UNETR")
                if p.dataSource == DATA_SOURCES[0] else p.dataFolder)
        request = requests.FinetuneRequest.fromParameters(p, dataFolder=data, adapterFolder=out, overwrite=earlier)
        request.validate()
        p.adapterFolder = out
        return request, lambda result: self.onFinetuneDone(result, out)

    def onFinetuneDone(self, result: jobs.JobResult, out: str) -> None:
        best = (result.done or {}).get("best")
        score = _(", best validation {best:.3f}").format(best=best) if best is not None else ""
        self.ui.statusLabel.text = _("adapter written to {out}{score}").format(out=out, score=score)

    def onSegmentButton(self) -> None:
        def prepare(p):
            adapter = adapter_folders.check_adapter_for(p.adapterFolder, "segmentation")
            volume = p.inputVolume
            image, mask = self.logic.exportForSegmentation(volume)
            segmentName = os.path.basename(os.path.normpath(adapter))
            def imported(result: jobs.JobResult) -> None:
                self.logic.importMask(mask, volume, segmentName, result.done)
                self.ui.statusLabel.text = slicer_app.segmented_text(volume.GetName(), segmentName, result.done)
            return requests.SegmentRequest.fromParameters(p, image=image, mask=mask), imported

        self.runButton("segment", _("Cannot start segmentation."), prepare)

    def onSynthesizeButton(self) -> None:
        def prepare(p):
            adapter_folders.check_adapter_for(p.adapterFolder, "synthesis")
            request = requests.SynthesizeRequest.fromParameters(p, outputFolder=self.logic.newWorkFolder("synthesized"))
            return request, lambda result: self.logic.importSynthesized((result.done or {}).get("volumes") or [])

        self.runButton("synthesize", _("Cannot start synthesis."), prepare)

    def onSaveAdapter(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Saving the adapter failed."), waitCursor=True):
            source = self._parameterNode.adapterFolder
            adapter_folders.check_adapter_folder(source)
            target = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Save adapter to folder"))
            if target:
                copied = adapter_folders.copy_adapter(source, target)
                self.ui.statusLabel.text = _("saved {files} to {target}").format(files=", ".join(copied), target=target)

    def onChooseBundleFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a MONAI bundle folder"))
        self._parameterNode.checkpointPath = folder or self._parameterNode.checkpointPath

    def onLoadAdapter(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Loading the adapter failed."), waitCursor=True):
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose an adapter folder"))
            if not folder:
                return
            config = adapter_folders.check_adapter_folder(folder)
            p = self._parameterNode
            p.adapterFolder = folder
            p.modelKind = "DDPM" if adapter_folders.adapter_task(config) == "synthesis" else "UNETR"
            p.skullStrip = adapter_folders.recorded_skull_strip(config)  # segment its scans as it was trained
            self.ui.statusLabel.text = _("adapter {method} (rank {rank}) loaded from {folder}").format(
                method=config.get("method", "?"), rank=config.get("rank", "?"), folder=folder)


class TensorPEFTLogic(ScriptedLoadableModuleLogic):
    """Starts workers, moves data between the scene and files, installs dependencies; usable without the GUI."""

    requirementsPath = os.path.join(_HERE, "Resources", "requirements.txt")

    def getParameterNode(self):
        return TensorPEFTParameterNode(super().getParameterNode())

    def startJob(self, args: list, name: str, raw: bool = False, process=None, **callbacks) -> jobs.WorkerJob:
        """Start ``tensorpeft ARGS`` (or ``python ARGS`` with ``raw``) in a worker process; poll the returned job."""
        python = slicer_app.python_executable(slicer)
        argv = [python, *args] if raw else requests.cli_command(python, args)
        job = jobs.WorkerJob(argv, name=name, process=process, env=environment.worker_environment(libraryParent()),
                             cwd=slicer_app.work_root(slicer), **callbacks)
        job.start()
        return job

    def runBlocking(self, request: requests.Request, name: str, timeout: float = 1800.0) -> jobs.JobResult:
        """Run a request to its end while keeping Slicer's event loop alive (self-test, scripts)."""
        job = self.startJob(request.asArgList(), name)
        if job.wait(timeout, idle=slicer.app.processEvents) is None:
            job.cancel()
            job.wait(job.grace_seconds + 5, idle=slicer.app.processEvents)
        return job.result

    @staticmethod
    def newWorkFolder(kind: str) -> str:
        return slicer_app.new_work_folder(slicer_app.work_root(slicer), kind)

    def exportTrainingPairs(self, pairs: list, withLabels: bool = True) -> str:
        return slicer_app.export_training_pairs(slicer.mrmlScene, pairs, self.newWorkFolder("training-data"), withLabels)

    def exportForSegmentation(self, volume) -> tuple:
        return slicer_app.export_for_segmentation(slicer.mrmlScene, volume, self.newWorkFolder("segment"))

    def importMask(self, mask: str, volume, segmentName: str, done=None):
        return slicer_app.import_mask(slicer, mask, volume, segmentName, done)

    def importSynthesized(self, paths: list) -> list:
        nodes = slicer_app.import_synthesized(slicer.mrmlScene, paths)
        slicer_app.show_volumes(slicer, nodes)
        return nodes

    @classmethod
    def missingDependencies(cls) -> list:
        return environment.missing_dependencies(cls.requirementsPath)

    def installDependencies(self) -> None:
        """On the main thread: torch through Slicer's PyTorch extension, the rest with pip (``slicer_setup``)."""
        slicer_setup.install_dependencies(slicer, self.requirementsPath, slicer_app.work_root(slicer))


class TensorPEFTTest(ScriptedLoadableModuleTest):
    """A tiny CPU fine-tune and segmentation on synthetic oblique, anisotropic volumes, checking the geometry."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.folder = tempfile.mkdtemp(prefix="tensorpeft-selftest-")

    def tearDown(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def runTest(self):
        # first: without the dependencies every step below would fail on some import, not with this message
        missing = TensorPEFTLogic.missingDependencies()
        if missing:
            self.fail("install the dependencies first (TensorPEFT panel → Install dependencies): " + ", ".join(missing))
        for test in (self.test_geometry_round_trip, self.test_finetune_and_segment):
            self.setUp()
            test()
            self.tearDown()

    def test_geometry_round_trip(self):
        from TensorPEFTLib.frontend import self_test  # after the dependency check: it needs numpy and pynrrd
        self.delayDisplay("Scene → file → scene keeps the IJK-to-RAS of an oblique, anisotropic volume")
        self.assertEqual(self_test.geometry_round_trip(slicer.mrmlScene, self.folder), [])

    def test_finetune_and_segment(self):
        from TensorPEFTLib.frontend import self_test
        volume, segmentation = self_test.finetune_and_segment(slicer.mrmlScene, self.folder,
                                                              TensorPEFTLogic().runBlocking, self.delayDisplay)
        slicer_app.show_segmentation(slicer, volume, segmentation)
        self.delayDisplay("Test passed")
