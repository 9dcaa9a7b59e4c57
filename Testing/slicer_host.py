"""Load the Slicer module file (TensorPEFT/TensorPEFT.py) outside the Slicer application and report what it did.

Run as a script in a child process (it changes the ``slicer`` package for the whole process):

    python Testing/slicer_host.py [--slicer-source SLICER_CHECKOUT] CHECK

MRML comes from the ``slicer-core`` wheel; ``qt`` and ``ctk`` are stood in by permissive classes (any method is a
no-op, any ``...Changed`` attribute is a signal). Slicer's own ``parameterNodeWrapper``, ``ScriptedLoadableModule``
and ``i18n`` come from ``--slicer-source`` (a Slicer source checkout, e.g. at tag v5.8.0): then the parameter node
and its GUI connectors are Slicer's real code. Without it, minimal stand-ins of those three let the module import
and its self-test run, but not the parameter node. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import types
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI = ROOT / "TensorPEFT" / "Resources" / "UI" / "TensorPEFT.ui"

STAND_IN_QT = '''
class Signal:
    def __init__(self):
        self.slots = []
    def connect(self, slot):
        self.slots.append(slot)
    def disconnect(self, slot=None):
        self.slots = [s for s in self.slots if slot is not None and s != slot]
    def emit(self, *args):
        for slot in list(self.slots):
            slot(*args)

class StandIn:
    """Any Qt/CTK class: properties remembered, ...Changed attributes are signals, other methods do nothing."""
    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_properties", {})
    def property(self, name):
        return self._properties.get(name)
    def setProperty(self, name, value):
        self._properties[name] = value
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name.endswith(("Changed", "changed", "toggled", "clicked", "timeout")):
            signal = Signal()
            object.__setattr__(self, name, signal)
            return signal
        return lambda *args, **kwargs: None

class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return 0  # enum values such as Qt.ToolTipRole

_classes = {}
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    if name not in _classes:
        _classes[name] = _Meta(name, (StandIn,), {})
    return _classes[name]
'''

STAND_IN_I18N = '''
def tr(text):
    return text
def translate(context, text):
    return text
'''

STAND_IN_SCRIPTED = '''
import unittest
import slicer

class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = type(self).__name__

class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent

class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[:-5]
    def getParameterNode(self):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
        node.SetAttribute("ModuleName", self.moduleName)
        return node

class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, *args, **kwargs):
        print(message)
'''

STAND_IN_WRAPPER = '''
class Choice:
    def __init__(self, choices):
        self.choices = choices
class WithinRange:
    def __init__(self, low, high):
        self.low, self.high = low, high
class GuiConnector:
    def __init__(self):
        self._callback = None
    def changed(self):
        if self._callback:
            self._callback()
def parameterNodeGuiConnector(cls):
    return cls
def unannotatedType(datatype):
    return getattr(datatype, "__origin__", datatype)
def parameterNodeWrapper(cls):
    return cls
'''


def make_overlay(folder: Path, slicer_source: Path | None) -> None:
    """qt.py, ctk.py and slicer/ (a namespace extension of the slicer-core package) in ``folder``."""
    for name in ("qt", "ctk"):
        (folder / f"{name}.py").write_text(STAND_IN_QT, encoding="utf-8")
    overlay = folder / "slicer"
    overlay.mkdir()
    # imported by slicer/__init__ before the other overlay modules (sorted names): the Slicer widget class the .ui
    # binds and Slicer's guiConnectors name at import time; its public names land on the slicer package
    names = ("qMRMLNodeComboBox", "qMRMLRangeWidget", "qMRMLSliderWidget", "qMRMLSpinBox", "qSlicerWidget")
    (overlay / "QtStandIns.py").write_text("import qt\n" + "".join(f"{n} = qt.{n}\n" for n in names), encoding="utf-8")
    if slicer_source is None:
        (overlay / "i18n.py").write_text(STAND_IN_I18N, encoding="utf-8")
        (overlay / "ScriptedLoadableModule.py").write_text(STAND_IN_SCRIPTED, encoding="utf-8")
        (overlay / "parameterNodeWrapper").mkdir()
        (overlay / "parameterNodeWrapper" / "__init__.py").write_text(STAND_IN_WRAPPER, encoding="utf-8")
        return
    python = slicer_source / "Base" / "Python" / "slicer"
    for name in ("i18n.py", "ScriptedLoadableModule.py"):
        shutil.copy(python / name, overlay / name)
    shutil.copytree(python / "parameterNodeWrapper", overlay / "parameterNodeWrapper")


def load_module(folder: Path, slicer_source: Path | None):
    make_overlay(folder, slicer_source)
    sys.path.insert(0, str(folder))
    import slicer  # the slicer-core package, extended by the overlay

    # slicer-core's package copies every public name of each module it finds onto ``slicer``, and
    # parameterNodeWrapper's includes its own ``util`` submodule: put Slicer's util back, as in the application
    slicer.util = sys.modules["slicer.util"]
    slicer.mrmlScene = slicer.vtkMRMLScene()
    import qt
    slicer.app = types.SimpleNamespace(testingEnabled=lambda: True, processEvents=lambda: None,
                                       temporaryPath=tempfile.mkdtemp(), slicerHome=str(folder))
    sys.path.insert(0, str(ROOT / "TensorPEFT"))
    import TensorPEFT

    return slicer, qt, TensorPEFT


def ui_namespace(qt, ctk, slicer):
    """One stand-in widget per .ui widget, of the stand-in class of its .ui class, with SlicerParameterName set."""
    widgets = {}
    for element in ET.parse(UI).getroot().iter("widget"):
        cls = element.get("class")
        factory = slicer.qMRMLNodeComboBox if cls == "qMRMLNodeComboBox" else getattr(ctk if cls.startswith("ctk") else qt, cls)
        widget = factory()
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                widget.setProperty("SlicerParameterName", prop.findtext("string"))
        widgets[element.get("name")] = widget
    return types.SimpleNamespace(**widgets)


def check_parameter_node(slicer, qt, module) -> dict:
    import ctk

    scripted = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    node = module.TensorPEFTParameterNode(scripted)
    ui = ui_namespace(qt, ctk, slicer)
    tag = node.connectGui(ui)
    shown_unset = {name: getattr(ui, name).currentPath for name in ("checkpointPathLineEdit", "dataFolderPathLineEdit",
                                                                      "adapterFolderPathLineEdit")}
    node.adapterFolder = "/runs/a"  # node → widget
    shown_set = ui.adapterFolderPathLineEdit.currentPath
    ui.dataFolderPathLineEdit.currentPath = "/data/train"  # widget → node, as a user's edit does
    ui.dataFolderPathLineEdit.currentPathChanged.emit()  # PythonQt calls a slot with the arguments it takes: none
    request = module.requests.FinetuneRequest.fromParameters(node, dataFolder=node.dataFolder,
                                                             adapterFolder=node.adapterFolder)
    node.disconnectGui(tag)
    return {"defaults": {name: getattr(node, name) for name in ("modelKind", "method", "device", "dataSource",
                                                                 "checkpointPath", "adapterFolder", "rank")},
            "shown_unset": shown_unset, "shown_set": shown_set, "data_folder": node.dataFolder,
            "finetune_args": request._args(), "request_problems": request.problems()}


def check_self_test(module) -> dict:
    """The self-test without dependencies: its first failure must be the clear message, before any other step."""
    module.TensorPEFTLogic.missingDependencies = classmethod(lambda cls: ["pynrrd>=1.0,<2"])
    test = module.TensorPEFTTest()
    ran = []
    test.test_geometry_round_trip = lambda: ran.append("geometry")
    test.test_finetune_and_segment = lambda: ran.append("finetune")
    try:
        test.runTest()
    except AssertionError as err:
        return {"failure": str(err), "ran": ran}
    return {"failure": None, "ran": ran}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slicer-source", type=Path)
    parser.add_argument("check", choices=["import", "parameter-node", "self-test"])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tensorpeft-slicer-host-"))
    try:
        slicer, qt, module = load_module(folder, args.slicer_source)
        report = {"python": list(sys.version_info[:2]), "torch_loaded": "torch" in sys.modules}
        if args.check == "parameter-node":
            report.update(check_parameter_node(slicer, qt, module))
        elif args.check == "self-test":
            report.update(check_self_test(module))
        print(json.dumps(report))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
