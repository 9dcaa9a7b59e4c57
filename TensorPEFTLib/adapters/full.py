"""Full fine-tuning: no adapter, every parameter trains. The baseline every PEFT method is measured against."""

from .registry import MethodSpec, register

register(MethodSpec(name="full", adapts_layers=False))
