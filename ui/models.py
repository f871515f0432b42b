"""The Models tab: download from the Hugging Face Hub, add a model folder, the cached models (and deleting
them), and the registry with each model's defaults and Core ML availability."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from backend import registry
from backend.types import UserError
from ui import present
from ui.common import PRIVATE, AppBase, model_choices


class ModelsTab(AppBase):
    """The Models tab's handlers and layout."""

    @staticmethod
    def cached_table():
        rows = [[c["repo"], present.fmt_bytes(c["bytes"])] for c in registry.cached_models()]
        return pd.DataFrame(rows or [["No models downloaded yet", "—"]], columns=["Repository", "Size on disk"])

    @staticmethod
    def cached_names():
        return [c["repo"] for c in registry.cached_models()]

    def download(self, name, progress=gr.Progress(track_tqdm=True)):
        entry = registry.get_entry(name)
        if entry is not None and entry.local_folder is not None:
            return (present.progress_html("done", f"{entry.title} ships with the app: nothing to download", 1, 1),
                    gr.skip(), gr.skip())
        repo = entry.hub if entry is not None else (name or "").strip()
        if not repo:
            return present.progress_html("error", "Pick a model to download"), gr.skip(), gr.skip()
        try:
            progress(0, desc=f"Contacting the Hugging Face Hub for {repo}")
            folder = registry.download(repo, progress=lambda msg: progress(0.02, desc=msg))
        except UserError as exc:
            return present.progress_html("error", str(exc)), gr.skip(), gr.skip()
        size = present.fmt_bytes(registry.folder_bytes(folder))
        return (present.progress_html("done", f"{repo} is ready ({size})", 1, 1), self.cached_table(),
                gr.update(choices=self.cached_names()))

    def delete(self, repo):
        if not repo:
            return present.progress_html("idle", "Pick a cached repository to delete"), gr.skip(), gr.skip()
        try:
            freed = registry.delete_cached(repo)
        except UserError as exc:
            return present.progress_html("error", str(exc)), gr.skip(), gr.skip()
        self.pipelines.clear()
        return (present.progress_html("done", f"Deleted {repo}: {present.fmt_bytes(freed)} freed", 1, 1),
                self.cached_table(), gr.update(choices=self.cached_names(), value=None))

    def add_folder(self, folder, name):
        try:
            entry = registry.add_local_model(folder or "", (name or "").strip() or None)
        except UserError as exc:
            return [present.progress_html("error", str(exc))] + [gr.skip()] * 3
        choices = model_choices(self.model)
        return [present.progress_html("done", f"Added {entry.name}: pick it in the model lists", 1, 1)] + [
            gr.update(choices=choices)] * 3

    @staticmethod
    def models_note() -> str:
        if registry.offline():
            return present.note_html("Offline (HF_HUB_OFFLINE=1): cached models and the embedded model work; "
                                     "downloading is off.", warn=True)
        return present.note_html("Downloads fetch only what the engines read: configs, tokenizers and safetensors "
                                 "weights (the fp16 variant where the repository has one). Pickle files are refused.")

    @staticmethod
    def registry_table():
        cached = {c["repo"] for c in registry.cached_models()}
        rows = []
        for m in registry.list_models():
            if m.local_folder is not None:
                source = "in the app" if not Path(m.path).is_absolute() else str(m.local_folder)
                status = "ready" if m.local_folder.is_dir() else "missing"
            else:
                source = m.hub + (f" + {m.transformer_file['repo']}" if m.transformer_file else "")
                status = "downloaded" if m.hub in cached else (
                    "not downloaded (gated: needs a Hub login)" if m.gated else "not downloaded")
            rows.append([m.name, m.title, source, registry.coreml_availability(m), present.fmt_defaults(m.defaults),
                         status])
        return pd.DataFrame(rows, columns=["Name", "Model", "Weights (MLX)", "Core ML", "Defaults", "Status"])

    def models_tab(self, page):
        """The tab's layout and events; `page` is its gr.Tab, whose tables are read again each time it opens."""
        u = self.ui
        gr.HTML(self.models_note())
        hub = [(m.title, m.name) for m in registry.list_models() if m.hub]
        with gr.Row(equal_height=False):
            with gr.Column():
                gr.Markdown("#### Download from the Hugging Face Hub")
                u.m_pick = gr.Dropdown(hub, value=hub[0][1] if hub else None, label="Model",
                                       allow_custom_value=True, info="Or type a Hub id: owner/name")
                u.m_download = gr.Button("Download", variant="primary")
                u.m_progress = gr.HTML(present.progress_html("idle", "Nothing downloading"))
                gr.Markdown("#### Add a model folder")
                u.m_folder = gr.Textbox(label="Folder", placeholder="/path/to/a/diffusers/model")
                u.m_name = gr.Textbox(label="Name (optional)")
                u.m_add = gr.Button("Add folder")
            with gr.Column():
                gr.Markdown("#### Cached models")
                u.m_table = gr.Dataframe(self.cached_table(), interactive=False, wrap=True, max_height=260)
                with gr.Row():
                    u.m_delete_pick = gr.Dropdown(self.cached_names(), label="Repository", scale=3)
                    u.m_delete = gr.Button("Delete", variant="stop", scale=1)
        gr.Markdown("#### Registry")
        u.m_registry = gr.Dataframe(self.registry_table(), interactive=False, wrap=True, max_height=460,
                                    column_widths=["13%", "23%", "22%", "17%", "15%", "10%"])
        u.m_download.click(self.download, u.m_pick, [u.m_progress, u.m_table, u.m_delete_pick],
                           show_progress_on=[u.m_progress], concurrency_id="download", concurrency_limit=1, **PRIVATE)
        u.m_delete.click(self.delete, u.m_delete_pick, [u.m_progress, u.m_table, u.m_delete_pick],
                         js="(repo) => (repo && confirm('Delete ' + repo + ' from the cache?')) ? repo : null",
                         **PRIVATE)
        u.m_add.click(self.add_folder, [u.m_folder, u.m_name], [u.m_progress, u.model, u.cmp_model, u.m_pick],
                      **PRIVATE)
        page.select(lambda: (self.registry_table(), self.cached_table(), gr.update(choices=self.cached_names())),
                    None, [u.m_registry, u.m_table, u.m_delete_pick], queue=False, **PRIVATE)
