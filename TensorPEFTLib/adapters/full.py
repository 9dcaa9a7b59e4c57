"""Full fine-tuning: no adapter, every parameter trains. The baseline every PEFT method is measured against."""

from .registry import MethodSpec, register

register(
    MethodSpec(
        name="full",
        summary="No adapter: every weight trains (the baseline; needs the most memory and storage).",
        reference="-",
        adapts_layers=False,
    )
)
