"""The UI's pure parts, without a server: the gallery paths a browser sends back (only this app's PNGs are taken),
the progress bar's time left, the precision note's measured factors, the charts, and a stopped comparison."""
import json
from types import SimpleNamespace

from PIL import Image

from backend.png import save_png
from ui import charts, cpu_speed, gallery, present
from ui.compare import compare_charts, compare_progress

PARAMS = {"prompt": "a red circle", "seed": 5, "steps": 3, "scheduler": "ddim", "width": 8, "height": 8,
          "model": "tiny"}


def test_only_pngs_of_the_outputs_folder_with_parameters_come_back_from_the_browser(tmp_path):
    outputs, elsewhere = tmp_path / "outputs", tmp_path / "elsewhere"
    good = save_png(Image.new("RGB", (8, 8)), outputs / "a.png", PARAMS)
    outside = save_png(Image.new("RGB", (8, 8)), elsewhere / "b.png", PARAMS)
    plain = outputs / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    (outputs / "notes.txt").write_text("x")
    sent = [str(good), str(outside), str(plain), str(outputs / "notes.txt"), str(outputs / "gone.png"),
            str(outputs / ".." / "elsewhere" / "b.png"), 42, {"path": str(good)}, "/etc/passwd"]
    items = gallery.trusted_items(sent, outputs)
    assert [i["path"] for i in items] == [str(good.resolve())]
    assert items[0]["caption"].startswith("seed 5 · a red circle · 3 steps")
    assert gallery.trusted_items("not a list", outputs) == [] and gallery.trusted_items(None, outputs) == []


def test_the_browser_state_key_is_kept_so_a_restart_still_reads_the_gallery(tmp_path):
    first = gallery.browser_state(tmp_path, tmp_path / "outputs")
    again = gallery.browser_state(tmp_path, tmp_path / "outputs")
    other = gallery.browser_state(tmp_path, tmp_path / "other-outputs")
    assert first.secret == again.secret and first.storage_key == again.storage_key
    assert other.storage_key != first.storage_key
    assert (tmp_path / "browser-state.key").stat().st_mode & 0o077 == 0


def test_time_left_counts_the_steps_to_go_and_the_decode():
    assert present.eta_seconds(5, 20, 10.0) == 30.0  # 15 steps at 2 s
    assert present.eta_seconds(5, 20, 10.0, 4.0) == 34.0
    html = present.progress_html("running", "Denoising", 5, 20, 0.5, eta=34.0)
    assert "about 34 s left" in html
    assert "left" not in present.progress_html("done", "Done", 20, 20, 0.5, eta=34.0)
    assert present.fmt_eta(150) == "about 2 min left" and present.fmt_eta(0) == ""


def test_the_precision_note_quotes_the_measured_factors_and_the_cpu(tmp_path):
    data = {"cpu": "Some CPU (AVX2)", "size": 128, "choices": {
        "fp32": {"seconds": 1.0, "factor": 1.0}, "fp16": {"seconds": 15.5, "factor": 15.5},
        "8-bit": {"seconds": 1.3, "factor": 1.3}}}
    text = cpu_speed.note(data, on_cpu=True)
    assert "fp16 16x" in text and "8-bit 1.3x" in text and "Some CPU (AVX2)" in text and "128 px" in text
    assert cpu_speed.note(data, on_cpu=False) is None
    (tmp_path / "speed.json").write_text(json.dumps(data))
    assert cpu_speed.load(tmp_path / "speed.json") == data and cpu_speed.load(tmp_path / "missing.json") is None
    shipped = cpu_speed.load()
    if shipped is not None:  # the measured file the app reads
        assert shipped["cpu"] and shipped["choices"]["fp32"]["factor"] == 1.0


def test_bar_charts_list_every_variant_with_its_value():
    html = charts.bar_chart_html("PSNR", [("MLX 8-bit", 57.8), ("MLX mixed-bit", 43.6), ("broken", float("nan"))],
                                 lambda v: f"{v:.1f} dB")
    assert html.count("class='sd-hbar'") == 2 and "57.8 dB" in html and "width:100.0%" in html
    assert "Appears as" in charts.bar_chart_html("PSNR", [])
    line = charts.line_chart_html("Latency", [(1, 10.0, "run 1"), (2, 12.0, "run 1"), (3, 9.0, "run 2")])
    assert line.count("<circle") == 3 and line.count("class='run'") == 1


def _result(key, status, psnr=None):
    return SimpleNamespace(label=key, status=status, psnr=psnr, ssim=None, weight_bytes=1e6, disk_bytes=1e6,
                           seconds=1.0, variant=SimpleNamespace(key=key))


def test_a_stopped_comparison_keeps_the_variants_done_and_shows_where_it_stopped():
    state = SimpleNamespace(finished=True, message="2 of 4 variants rendered with seed 1 (stopped)", results=[
        _result("fp16", "done", float("inf")), _result("8-bit", "done", 50.0), _result("6-bit", "skipped"),
        _result("4-bit", "skipped")])
    status = compare_progress(state)
    assert "sd-progress stopped" in status and "variant 2 / 4" in status and "width:50.0%" in status
    quality, size, seconds = compare_charts(state)
    assert quality.count("sd-hbar'") == 1 and "8-bit: 50.0 dB" in quality  # fp16 has no PSNR against itself
    assert size.count("sd-hbar'") == 2 and seconds.count("sd-hbar'") == 2
