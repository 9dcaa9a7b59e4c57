"""Render docs/images/slicer-panel.png: the TensorPEFT panel as Qt draws TensorPEFT/Resources/UI/TensorPEFT.ui.

Not a screenshot of Slicer (that needs the application): Slicer's custom widgets are swapped for their nearest Qt
classes (ctkCollapsibleButton → QGroupBox, qMRMLNodeComboBox → QComboBox, ctkPathLineEdit → QLineEdit) and the panel
is filled with illustrative values, then drawn offscreen. Needs PySide6 (not a TensorPEFT dependency):

    python -m venv /tmp/qt && /tmp/qt/bin/pip install PySide6-Essentials
    QT_QPA_PLATFORM=offscreen /tmp/qt/bin/python docs/render_slicer_panel.py
"""

import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QBuffer, QByteArray, QIODevice  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import QApplication, QComboBox, QTableWidgetItem, QWidget  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from TensorPEFTLib.frontend.progress import Progress  # noqa: E402
from TensorPEFTLib.frontend.requests import DEVICE_CHOICES, MODEL_KINDS, SKULL_STRIP_CHOICES, method_summaries  # noqa: E402

METHODS = method_summaries()

SWAP = {"qMRMLWidget": "QWidget", "ctkCollapsibleButton": "QGroupBox", "qMRMLNodeComboBox": "QComboBox",
        "ctkPathLineEdit": "QLineEdit"}
DROP = {"filters", "nameFilters", "nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled",
        "collapsed", "SlicerParameterName"}


def plain_ui() -> bytes:
    tree = ET.parse(ROOT / "TensorPEFT" / "Resources" / "UI" / "TensorPEFT.ui")
    root = tree.getroot()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        collapsed = any(p.get("name") == "collapsed" for p in widget.findall("property"))
        for prop in list(widget.findall("property")):
            if prop.get("name") in DROP:
                widget.remove(prop)
            elif cls == "ctkCollapsibleButton" and prop.get("name") == "text":
                prop.set("name", "title")
                prop.find("string").text = ("▸ " if collapsed else "▾ ") + prop.find("string").text
        if cls == "ctkCollapsibleButton" and collapsed:
            for layout in widget.findall("layout"):
                widget.remove(layout)
        if cls in SWAP:
            widget.set("class", SWAP[cls])
    root.remove(root.find("customwidgets"))
    root.remove(root.find("connections"))
    return ET.tostring(root, encoding="utf-8")


def main() -> None:
    app = QApplication([])
    data = QByteArray(plain_ui())
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    find = lambda name, cls=None: panel.findChild(cls or QWidget, name)  # noqa: E731

    find("modelKindComboBox").addItems(list(MODEL_KINDS))
    find("useDemoModelCheckBox").setChecked(False)  # a paper-size UNETR checkpoint of the user's
    find("checkpointPathLineEdit").setText("~/models/unetr_pretrained_128.pt")
    find("methodComboBox").addItems(list(METHODS))
    find("methodDescriptionLabel").setText(METHODS["lora-pt"])
    find("parameterCountLabel").setText("2,844,522 of 93,029,602 parameters (3.06%) on unetr-paper; adapter 165,960")
    find("dataSourceComboBox").addItems(["Volumes and segmentations in the scene", "Decathlon folder"])
    table = find("pairsTable")
    table.setRowCount(6)
    for row in range(6):  # FreeSurfer subjects: each segmentation has a left and a right hippocampus segment
        table.setItem(row, 0, QTableWidgetItem(f"sub-{row + 1:02d} T1"))
        table.setItem(row, 1, QTableWidgetItem(f"sub-{row + 1:02d} aseg hippocampi"))
    find("pairsStatusLabel").setText("6 complete pair(s), 2 structures")  # the pairs table's own wording
    find("skullStripComboBox").addItems(list(SKULL_STRIP_CHOICES))  # Slicer fills it from the parameter's Choice
    for name in ("dataFolderLabel", "dataFolderPathLineEdit"):
        find(name).setVisible(False)
    find("deviceComboBox").addItems(list(DEVICE_CHOICES))
    find("deviceInfoLabel").setText("GPU: NVIDIA RTX 4090 (23.6 GiB), torch 2.5.1+cu121")
    find("cpuWarningLabel").setVisible(False)
    find("adapterFolderPathLineEdit").setText("~/TensorPEFT/hippocampus-lora-pt-r1")
    find("finetuneButton").setText("Cancel")
    progress = Progress()  # the status line as the module writes it, from the worker's events (illustrative numbers)
    for event in ({"event": "start", "kind": "finetune", "steps": 1250, "metric": "dice"},
                  {"event": "eval", "dice": 0.781, "best": 0.781,
                   "structures": {"Left-Hippocampus": 0.768, "Right-Hippocampus": 0.794}},
                  {"event": "step", "step": 500, "loss": 0.4123, "eta_seconds": 70}):
        progress.update(event)
    find("progressBar").setValue(round(1000 * progress.fraction))
    find("statusLabel").setText(progress.text())
    find("inputVolumeSelector", QComboBox).addItem("sub-07 T1")
    for name in ("segmentButton", "saveAdapterButton", "loadAdapterButton"):  # disabled while a job runs
        find(name).setEnabled(False)

    panel.resize(440, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    out = ROOT / "docs" / "images" / "slicer-panel.png"
    panel.grab().save(str(out))
    print(out)


if __name__ == "__main__":
    main()
