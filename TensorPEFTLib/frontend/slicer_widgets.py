"""Parameter-node ↔ widget glue for Slicer (imports Slicer's ``ctk`` and ``parameterNodeWrapper``: load it in Slicer
only). Registering a connector is what importing this module does."""

from __future__ import annotations

import ctk
from slicer.parameterNodeWrapper import GuiConnector, parameterNodeGuiConnector, unannotatedType


@parameterNodeGuiConnector
class PathLineEditToTextConnector(GuiConnector):
    """A text field ↔ ctkPathLineEdit. Slicer's own connector binds ``pathlib.Path``, whose unset value ``Path()``
    the field shows as "."; a text field stays empty until the user chooses a path."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) == str

    @staticmethod
    def create(widget, datatype):
        return PathLineEditToTextConnector(widget) if PathLineEditToTextConnector.canRepresent(widget, datatype) else None

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self) -> None:
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self) -> None:
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.currentPath

    def write(self, value: str) -> None:
        self._widget.currentPath = value


class TrainingPairsTable:
    """The panel's table of (volume, segmentation) node pairs: one ``qMRMLNodeComboBox`` per cell, a status line
    counting the complete pairs and the structures their segments name. ``labels=False`` (synthesis) counts volumes
    alone. ``onChanged`` is called when a cell changes (the panel's estimates depend on the structures)."""

    def __init__(self, table, statusLabel, scene, onChanged=None) -> None:
        self.table, self.statusLabel, self.scene = table, statusLabel, scene
        self.onChanged = onChanged
        self.labels = True
        table.setHorizontalHeaderLabels(["Volume", "Segmentation"])

    def addRow(self, volume=None, segmentation=None) -> None:
        import slicer

        row = self.table.rowCount
        self.table.insertRow(row)
        for column, (nodeType, node) in enumerate((("vtkMRMLScalarVolumeNode", volume),
                                                   ("vtkMRMLSegmentationNode", segmentation))):
            combo = slicer.qMRMLNodeComboBox()
            combo.nodeTypes = [nodeType]
            combo.showChildNodeTypes = False
            combo.addEnabled = combo.removeEnabled = False
            combo.noneEnabled = True
            combo.setMRMLScene(self.scene)
            combo.setCurrentNode(node)
            combo.connect("currentNodeChanged(vtkMRMLNode*)", lambda *args: self._changed())
            self.table.setCellWidget(row, column, combo)
        self._changed()

    def removeCurrentRow(self) -> None:
        row = self.table.currentRow()
        self.table.removeRow(row if row >= 0 else self.table.rowCount - 1)
        self._changed()

    def fillFromScene(self) -> int:
        """One row per segmentation paired with its volume (:func:`scene.find_training_pairs`); the rows made."""
        from .scene import find_training_pairs

        self.table.setRowCount(0)
        for volume, segmentation in find_training_pairs(self.scene):
            self.addRow(volume, segmentation)
        return self.table.rowCount

    def pairs(self) -> list:
        cells = [(self.table.cellWidget(row, 0).currentNode(), self.table.cellWidget(row, 1).currentNode())
                 for row in range(self.table.rowCount)]
        return [(volume, segmentation) for volume, segmentation in cells if volume is not None or segmentation is not None]

    def structureCount(self) -> int:
        """How many structures a fine-tune on these pairs learns (:func:`segmentations.structure_count`; 1 without
        labels: synthesis)."""
        from .segmentations import structure_count

        return structure_count(self.pairs()) if self.labels else 1

    def updateStatus(self) -> int:
        """Show the complete pairs (and their structures, when more than one); returns the structure count."""
        n = len([v for v, s in self.pairs() if v is not None and (s is not None or not self.labels)])
        advice = " (5–10 are recommended)" if n < 5 else ""
        structures = self.structureCount()
        self.statusLabel.text = f"{n} complete pair(s){advice}" + (f", {structures} structures" if n and structures > 1 else "")
        return structures

    def _changed(self) -> None:
        self.updateStatus()
        if self.onChanged is not None:
            self.onChanged()


def timer(milliseconds: int, slot, singleShot: bool = False):
    """A started-on-demand ``QTimer`` calling ``slot``."""
    import qt

    result = qt.QTimer()
    result.setInterval(milliseconds)
    result.setSingleShot(singleShot)
    result.connect("timeout()", slot)
    return result
