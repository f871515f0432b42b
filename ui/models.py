"""The Models tab: every registry entry's state (embedded, downloaded, not downloaded, needs a Hub login; Core ML
published or needs an export) and size, a download of the picked entry with progress, adding a model folder (only
when the server allows it: --allow-add-folder), and the cached models (and deleting them)."""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import gradio as gr
import pandas as pd

from backend import registry
from backend.types import UserError
from ui import present
from ui.common import PRIVATE, AppBase, model_choices

FORWARDED = ("forwarded", "x-forwarded-for", "x-real-ip")  # a proxy in front: the peer address is not the client


def is_loopback(host) -> bool:
    """An address of this machine: 127.0.0.0/8, ::1 (or an IPv4-mapped loopback)."""
    try:
        ip = ipaddress.ip_address(str(host or "").split("%")[0])
    except ValueError:
        return str(host) == "localhost"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _size(status: registry.ModelStatus) -> str:
    if status.disk_bytes:
        return f"{present.fmt_bytes(status.disk_bytes)} on disk"
    if status.download_gb:
        return f"≈ {status.download_gb:g} GB to download"
    return "—"


class ModelsTab(AppBase):
    """The Models tab's handlers and layout."""

    # -- who may add a model folder ------------------------------------------------------------------------
    def add_folder_refusal(self, request: Optional[gr.Request]) -> Optional[str]:
        """None when this request may add a model folder, else the sentence why not (the server's
        --allow-add-folder: off, "local" for loopback clients without a proxy or a public link, or "any")."""
        mode = self.add_folder_mode
        if mode == "off":
            return ("Adding model folders from the browser is off: the server was started without "
                    "--allow-add-folder (python app.py --allow-add-folder lets a browser on this machine add them).")
        if mode == "any":
            return None
        if self.shared:
            return ("Adding model folders is allowed from this machine only (--allow-add-folder), and this server "
                    "also has a public link (--share), through which every client looks local: it is off.")
        client = getattr(request, "client", None) if request is not None else None
        host = getattr(client, "host", None)
        try:
            headers = {str(k).lower() for k in request.headers.keys()} if request is not None else set()
        except AttributeError:
            headers = set()
        if any(h in headers for h in FORWARDED):
            return ("Adding model folders is allowed from this machine only (--allow-add-folder), and this request "
                    "came through a proxy: it is off.")
        if not is_loopback(host):
            return (f"Adding model folders is allowed from this machine only (--allow-add-folder); this request came "
                    f"from {host or 'an unknown address'}. Start the server with --allow-add-folder any to let "
                    "other clients add folders.")
        return None

    def add_folder_section(self, request: gr.Request = None):
        """The add-a-folder controls as this client may use them: the reason, and enabled or not."""
        refusal = self.add_folder_refusal(request)
        note = present.note_html(refusal, warn=True) if refusal else present.note_html(
            "Give the full path of one diffusers model folder (model_index.json, unet/ or transformer/, vae/, "
            "text encoders, tokenizers; safetensors weights). It is checked before it is remembered; folders are "
            "never searched.")
        enabled = gr.update(interactive=refusal is None)
        return note, enabled, enabled, enabled

    # -- tables --------------------------------------------------------------------------------------------
    @staticmethod
    def cached_table():
        rows = [[c["repo"], present.fmt_bytes(c["bytes"])] for c in registry.cached_models()]
        return pd.DataFrame(rows or [["No models downloaded yet", "—"]], columns=["Repository", "Size on disk"])

    @staticmethod
    def cached_names():
        return [c["repo"] for c in registry.cached_models()]

    @staticmethod
    def statuses() -> list:
        """(entry, status) of every registry entry, from one scan of the Hub cache and one token look-up."""
        repos = {r.repo_id: r for r in registry.cached_repos()}
        token = registry.hub_token_found()
        return [(m, registry.model_status(m, repos, token)) for m in registry.list_models()]

    @classmethod
    def registry_table(cls):
        rows = []
        for m, s in cls.statuses():
            if m.local_folder is not None:
                source = "in the app" if not Path(m.path).is_absolute() else str(m.local_folder)
            else:
                source = m.hub + (f" + {m.transformer_file['repo']}" if m.transformer_file else "")
            defaults = {k: v for k, v in {**m.native, **m.defaults}.items() if k != "family"}
            rows.append([m.name, m.title, s.state, _size(s), source, s.coreml, present.fmt_defaults(defaults)])
        return pd.DataFrame(rows, columns=["Name", "Model", "State", "Size", "Weights (MLX)", "Core ML", "Defaults"])

    @classmethod
    def download_choices(cls) -> list:
        return [(f"{m.title} · {s.state}", m.name) for m, s in cls.statuses() if m.hub]

    @staticmethod
    def entry_info(name) -> str:
        """The picked entry: its state, its size (to download, or on disk) and what to do."""
        entry = registry.get_entry(name or "")
        if entry is None:
            repo = (name or "").strip()
            return present.note_html(f"{repo}: a Hub id outside the registry; only its configs, tokenizers and "
                                     "safetensors weights are fetched" if repo else "Pick a model or type a Hub id")
        s = registry.model_status(entry)
        text = f"{entry.title}: {s.state} · {_size(s)} · {s.detail} · Core ML: {s.coreml}"
        return present.note_html(text, warn=s.state in ("needs Hub login", "missing"))

    # -- handlers ------------------------------------------------------------------------------------------
    def model_lists(self) -> list:
        """The Generate and Compare model lists as they are now (a page load reads them again)."""
        choices = model_choices(self.model)
        return [gr.update(choices=choices), gr.update(choices=choices)]

    def _refreshed(self) -> list:
        """What a download or an added folder changes: the registry table, the entry info and every model list
        (the Generate and Compare dropdowns mark what is not downloaded)."""
        return [self.registry_table(), *self.model_lists(), gr.update(choices=self.download_choices())]

    def download(self, name, progress=gr.Progress(track_tqdm=True)):
        """Download the picked entry (or a typed Hub id): what the engines read, the fp16 variant when there is
        one; SD3 without its T5 encoder (the app's default; ticking T5 fetches it on first use)."""
        keep = [gr.skip()] * 7
        entry = registry.get_entry(name or "")
        if entry is not None and entry.local_folder is not None:
            return [present.progress_html("done", f"{entry.title} is on this machine: nothing to download", 1, 1)
                    ] + keep
        repo = entry.hub if entry is not None else (name or "").strip()
        if not repo:
            return [present.progress_html("error", "Pick a model to download")] + keep
        skip = ("text_encoder_3",) if entry is not None and (entry.native.get("family") == "sd3") else ()
        try:
            progress(0, desc=f"Contacting the Hugging Face Hub for {repo}")
            folder = registry.download(repo, progress=lambda msg: progress(0.02, desc=msg), skip=skip)
            extra = registry.transformer_override(entry, lambda msg: progress(0.5, desc=msg))
        except UserError as exc:
            return [present.progress_html("error", str(exc))] + keep
        size = present.fmt_bytes(registry.folder_bytes(folder) + (registry.folder_bytes(extra) if extra else 0))
        return [present.progress_html("done", f"{repo} is ready ({size})", 1, 1), self.cached_table(),
                gr.update(choices=self.cached_names()), self.entry_info(name)] + self._refreshed()

    def delete(self, repo):
        if not repo:
            return [present.progress_html("idle", "Pick a cached repository to delete")] + [gr.skip()] * 6
        try:
            freed = registry.delete_cached(repo)
        except UserError as exc:
            return [present.progress_html("error", str(exc))] + [gr.skip()] * 6
        self.pipelines.clear()
        return [present.progress_html("done", f"Deleted {repo}: {present.fmt_bytes(freed)} freed", 1, 1),
                self.cached_table(), gr.update(choices=self.cached_names(), value=None)] + self._refreshed()

    def add_folder(self, folder, name, request: gr.Request = None):
        """Remember a model folder, if this server lets this client (add_folder_refusal) and the folder holds a
        model (registry.add_local_model: a few reads of that folder, never a search)."""
        keep = [gr.skip()] * 4
        refusal = self.add_folder_refusal(request)
        if refusal:
            return [present.progress_html("error", refusal)] + keep
        try:
            entry = registry.add_local_model(folder or "", (name or "").strip() or None)
        except UserError as exc:
            return [present.progress_html("error", str(exc))] + keep
        return [present.progress_html("done", f"Added {entry.name}: pick it in the model lists", 1, 1)
                ] + self._refreshed()

    @staticmethod
    def models_note() -> str:
        if registry.offline():
            return present.note_html("Offline (HF_HUB_OFFLINE=1): cached models and the embedded model work; "
                                     "downloading is off.", warn=True)
        return present.note_html("Downloads fetch only what the engines read: configs, tokenizers and safetensors "
                                 "weights (the fp16 variant where the repository has one). Pickle files are refused. "
                                 "Gated repositories need their licence accepted on huggingface.co and a login "
                                 "(`hf auth login` or HF_TOKEN).")

    def models_tab(self, page):
        """The tab's layout and events; `page` is its gr.Tab, whose tables are read again each time it opens."""
        u = self.ui
        gr.HTML(self.models_note())
        hub = self.download_choices()
        first = hub[0][1] if hub else None
        note, *_ = self.add_folder_section(None)
        allowed = self.add_folder_mode == "any"  # else decided per client when the tab opens
        with gr.Row(equal_height=False):
            with gr.Column():
                gr.Markdown("#### Download from the Hugging Face Hub")
                u.m_pick = gr.Dropdown(hub, value=first, label="Model", allow_custom_value=True,
                                       info="Or type a Hub id: owner/name", elem_id="m-pick")
                u.m_info = gr.HTML(self.entry_info(first), elem_id="m-info")
                u.m_download = gr.Button("Download", variant="primary", elem_id="m-download")
                u.m_progress = gr.HTML(present.progress_html("idle", "Nothing downloading"), elem_id="m-progress")
                gr.Markdown("#### Add a model folder")
                u.m_add_note = gr.HTML(note if self.add_folder_mode != "local" else present.note_html(
                    "Adding a folder is allowed from a browser on this machine (--allow-add-folder)."),
                    elem_id="m-add-note")
                u.m_folder = gr.Textbox(label="Folder", placeholder="/path/to/a/diffusers/model",
                                        interactive=allowed, elem_id="m-folder")
                u.m_name = gr.Textbox(label="Name (optional)", interactive=allowed)
                u.m_add = gr.Button("Add folder", interactive=allowed, elem_id="m-add")
            with gr.Column():
                gr.Markdown("#### Cached models")
                u.m_table = gr.Dataframe(self.cached_table(), interactive=False, wrap=True, max_height=260)
                with gr.Row():
                    u.m_delete_pick = gr.Dropdown(self.cached_names(), label="Repository", scale=3)
                    u.m_delete = gr.Button("Delete", variant="stop", scale=1)
        gr.Markdown("#### Registry")
        u.m_registry = gr.Dataframe(self.registry_table(), interactive=False, wrap=True, max_height=460,
                                    elem_id="m-registry",
                                    column_widths=["11%", "19%", "10%", "11%", "18%", "17%", "14%"])
        refreshed = [u.m_registry, u.model, u.cmp_model, u.m_pick]
        u.m_pick.change(self.entry_info, u.m_pick, u.m_info, queue=False, **PRIVATE)
        u.m_download.click(self.download, u.m_pick, [u.m_progress, u.m_table, u.m_delete_pick, u.m_info] + refreshed,
                           show_progress_on=[u.m_progress], concurrency_id="download", concurrency_limit=1, **PRIVATE)
        u.m_delete.click(self.delete, u.m_delete_pick, [u.m_progress, u.m_table, u.m_delete_pick] + refreshed,
                         js="(repo) => (repo && confirm('Delete ' + repo + ' from the cache?')) ? repo : null",
                         **PRIVATE)
        u.m_add.click(self.add_folder, [u.m_folder, u.m_name], [u.m_progress] + refreshed, **PRIVATE)
        page.select(self.on_open, u.m_pick, [u.m_registry, u.m_table, u.m_delete_pick, u.m_pick, u.m_info,
                                             u.m_add_note, u.m_folder, u.m_name, u.m_add], queue=False, **PRIVATE)

    def on_open(self, picked, request: gr.Request = None):
        """The tab opened: its tables read again, and the add-a-folder controls as this client may use them."""
        return [self.registry_table(), self.cached_table(), gr.update(choices=self.cached_names()),
                gr.update(choices=self.download_choices()), self.entry_info(picked), *self.add_folder_section(request)]
