"""The page: a side panel with the workflow (data, model, fine-tune, segment, synthesize, adapters) beside
trame-slicer's slice and 3D views. Elements the browser tests click carry ``id="tp-..."``."""

from __future__ import annotations

from typing import Any


def build_page(server: Any, viewer: Any, session: Any) -> Any:
    from trame.ui.vuetify3 import SinglePageWithDrawerLayout
    from trame.widgets import html
    from trame.widgets import vuetify3 as v3

    from .session import FORM_FIELDS

    ctrl = server.controller
    # the fields' values travel with a button's click (AppSession.take_form): "[{skull_strip: skull_strip, ...}]"
    form = "[{" + ", ".join(f"{key}: {key}" for key in FORM_FIELDS) + "}]"
    with SinglePageWithDrawerLayout(server, full_height=True) as layout:
        layout.title.set_text("TensorPEFT")
        with layout.toolbar:
            v3.VSpacer()
            html.Div("{{ device_text }}", id="tp-device", classes="text-caption mr-4")
        with layout.drawer as drawer:
            drawer.width = 380
            with html.Div(classes="pa-3", style="font-size: 14px"):
                # one line for what went wrong, the log one click away; never a traceback
                v3.VAlert(v_if="error", type="error", density="compact", text=("error",), id="tp-error",
                          classes="mb-2", closable=True, click_close="error = ''")
                v3.VAlert(v_if="info && !error", type="info", density="compact", text=("info",), id="tp-info",
                          variant="tonal", classes="mb-2")

                html.Div("1 · Data", classes="text-subtitle-2")
                v3.VSelect(label="Folder under the data root", items=("folders",), v_model=("folder_choice", None),
                           density="compact", hide_details=True, id="tp-folder",
                           click=(ctrl.refresh_folders,),  # read on click: folders copied in since are listed
                           update_modelValue=(ctrl.open_folder, "[$event]"))
                v3.VSelect(v_if="cases.length", label="Volume", items=("cases",), v_model=("case_index",),
                           density="compact", hide_details=True, classes="mt-2", id="tp-case",
                           update_modelValue=(ctrl.select_case, "[$event]"))
                html.Div("{{ case_text }}", classes="text-caption mb-2")
                v3.VSelect(label="Whole-head scans (fine-tune and segment)", items=("skull_strip_choices",),
                           v_model=("skull_strip",), density="compact", hide_details=True, id="tp-skull-strip")

                html.Div("2 · Model and adapter", classes="text-subtitle-2 mt-2")
                with v3.VBtnToggle(v_model=("model_kind",), mandatory=True, density="compact", classes="mb-2",
                                   update_modelValue=(ctrl.set_kind, "[$event]")):
                    v3.VBtn("UNETR", value="UNETR", id="tp-kind-unetr")
                    v3.VBtn("DDPM", value="DDPM", id="tp-kind-ddpm")
                v3.VSelect(label="Model", items=("models",), v_model=("model",), density="compact",
                           hide_details=True)
                with html.Div(classes="d-flex mt-2", style="gap: 8px"):
                    v3.VSelect(label="Method", items=("methods",), v_model=("method",), density="compact",
                               hide_details=True, style="flex: 2")
                    v3.VTextField(label="Rank", v_model_number=("rank",), type="number", density="compact",
                                  hide_details=True, style="flex: 1")
                html.Div("{{ param_count }}", id="tp-params", classes="text-caption")
                html.Div("{{ cpu_warning }}", v_if="cpu_warning", classes="text-caption text-warning")

                html.Div("3 · Fine-tune", classes="text-subtitle-2 mt-3")
                with html.Div(classes="d-flex", style="gap: 8px"):
                    v3.VTextField(label="Steps (0 = auto)", v_model_number=("steps",), type="number", density="compact",
                                  hide_details=True, id="tp-steps")
                    v3.VTextField(label="Validate every (0 = auto)", v_model_number=("eval_every",), type="number",
                                  density="compact", hide_details=True, id="tp-eval-every")
                v3.VTextField(v_if="model_kind == 'UNETR'", label="Structures (label values; empty = all)",
                              v_model=("labels",), density="compact", hide_details=True, classes="mt-2",
                              id="tp-labels", placeholder="e.g. 17 53, or left=17 right=53, or 17+53 as one")
                with html.Div(classes="d-flex mt-2", style="gap: 8px"):
                    v3.VBtn("Fine-tune", id="tp-finetune", color="primary", disabled=("job_busy",),
                            click=(ctrl.finetune, form))
                    v3.VBtn("Resume", id="tp-resume", disabled=("job_busy || !can_resume",),
                            click=(ctrl.resume, form))
                    v3.VBtn("Cancel", id="tp-cancel", color="error", disabled=("!job_busy",),
                            click=(ctrl.cancel,))
                v3.VProgressLinear(model_value=("progress",), height=8, color="primary", classes="mt-2",
                                   id="tp-progress", indeterminate=("job_busy && progress == 0",))
                html.Div("{{ progress_text }}{{ eta ? ' · ETA ' + eta : '' }}", id="tp-status",
                         classes="text-caption")
                html.Div(v_html=("curve",), id="tp-curve")

                html.Div("4 · Segment / synthesize", classes="text-subtitle-2 mt-3")
                with html.Div(v_if="model_kind == 'UNETR'"):
                    html.Div("with {{ adapter || model }}", classes="text-caption")
                    v3.VBtn("Segment the volume", id="tp-segment", color="primary", disabled=("job_busy",),
                            click=(ctrl.segment, form))
                with html.Div(v_if="model_kind == 'DDPM'"):
                    with html.Div(classes="d-flex", style="gap: 8px"):
                        v3.VTextField(label="Volumes", v_model_number=("synth_count",), type="number",
                                      density="compact", hide_details=True, id="tp-synth-count")
                        v3.VTextField(label="Sampling steps", v_model_number=("synth_steps",), type="number",
                                      density="compact", hide_details=True, id="tp-synth-steps")
                    v3.VBtn("Synthesize", id="tp-synthesize", color="primary", disabled=("job_busy",),
                            click=(ctrl.synthesize, form), classes="mt-2")
                    v3.VSelect(v_if="synthesized.length", label="Generated volumes", items=("synthesized",),
                               v_model=("synth_index",), density="compact", hide_details=True, classes="mt-2",
                               id="tp-synthesized", update_modelValue=(ctrl.show_synthesized, "[$event]"))

                html.Div("5 · Adapters", classes="text-subtitle-2 mt-3")
                html.Div("current: {{ adapter || '(none: the model as it is)' }}", id="tp-adapter",
                         classes="text-caption")
                with html.Div(classes="d-flex", style="gap: 8px"):
                    v3.VTextField(label="Save to (folder under the data root)", v_model=("save_to",),
                                  density="compact", hide_details=True, id="tp-save-to")
                    v3.VBtn("Save", id="tp-save", disabled=("job_busy || !adapter",),
                            click=(ctrl.save_adapter, form))
                with html.Div(classes="d-flex mt-2", style="gap: 8px"):
                    v3.VSelect(label="Load an adapter folder", items=("adapter_folders", []),
                               v_model=("adapter_to_load",), density="compact", hide_details=True,
                               click=(ctrl.list_adapters,), id="tp-adapter-to-load")
                    v3.VBtn("Load", id="tp-load", disabled=("job_busy || !adapter_to_load",),
                            click=(ctrl.load_adapter, form))

                v3.VBtn("Log", id="tp-log-button", variant="text", size="small", classes="mt-3",
                        click="show_log = !show_log")
                html.Pre("{{ log }}", v_if="show_log", id="tp-log",
                         style="max-height: 240px; overflow: auto; font-size: 11px; background: #f4f4f4")
        with layout.content:
            viewer.layout_manager.initialize_layout_grid(layout)
    return layout
