"""`infer serve`: the page in a real browser, its HTTP API from gradio_client, mounting into FastAPI, clear errors."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_video_io import look, pattern, write_input
from guards import HANG_GUARD

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# what a closed network needs: no background connections, no sandbox as root, no GPU
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe():
    from infer import InsV2VPipeline

    pipe = InsV2VPipeline.from_pretrained("tiny")
    pipe.editor.sampling = {**(pipe.editor.sampling or {}), "num_inference_steps": 2}  # a quick default
    return pipe


@pytest.fixture(scope="module")
def server(pipe):
    from infer.serve import build_app, launch

    app = build_app(pipe, max_seconds=5)
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def clip_with_audio(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    return write_input(folder / "card.mp4", [pattern(i, 32, 48) for i in range(12)], rate=8, audio="aac")


def test_the_page_edits_in_a_real_browser(server, clip_with_audio, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (`apt-get install -y chromium`; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(accept_downloads=True, viewport={"width": 1280, "height": 900})
        page.goto(server)
        # the page's order: the upload, the instruction as its first text box, a button labelled Edit
        assert page.locator("textarea").first.get_attribute("placeholder") == "make it snowy"
        page.locator("#source input[type=file]").set_input_files(str(clip_with_audio))
        page.locator("#source video").wait_for(timeout=HANG_GUARD * 1000)
        page.locator("#instruction textarea").fill("make it red")
        page.get_by_role("button", name="Edit", exact=True).click()
        page.locator("#edited video").wait_for(timeout=HANG_GUARD * 1000)
        link = page.locator("#download a").first
        link.wait_for(timeout=HANG_GUARD * 1000)
        with page.expect_download() as download:
            link.click()
        saved = tmp_path / "download.mp4"
        download.value.save_as(saved)
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        if os.environ.get("INSV2V_SCREENSHOT"):  # how docs/serve.png is made
            shutil.copy(tmp_path / "page.png", os.environ["INSV2V_SCREENSHOT"])
        # a file that is not a video: one clear message in the page, no traceback
        bad = tmp_path / "notes.mp4"
        bad.write_text("this is not a video")
        page.locator("#source button[aria-label='Clear']").first.click()
        page.locator("#source input[type=file]").set_input_files(str(bad))
        page.get_by_role("button", name="Edit", exact=True).click()
        message = page.get_by_text("not a video this page can read", exact=False).first
        message.wait_for(timeout=HANG_GUARD * 1000)
        assert "Traceback" not in page.content()
        browser.close()
    seen = look(saved)
    assert seen["frames"] == 12 and seen["audio"] == "aac"  # every frame, and the source's sound


def test_the_http_api_from_gradio_client(server, clip_with_audio, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    played, downloaded = client.predict(
        handle_file(str(clip_with_audio)), "make it red", 7.5, 1.2, 2, True, False, 0, 32, api_name="/edit")
    path = downloaded if isinstance(downloaded, str) else downloaded["path"]
    assert look(Path(path))["frames"] == 12
    long = write_input(tmp_path / "long.mp4", [pattern(i, 16, 16) for i in range(80)], rate=8)  # 10 s > 5 s
    with pytest.raises(Exception, match="at most 5 s"):
        client.predict(handle_file(str(long)), "make it red", 7.5, 1.2, 2, True, False, 0, 32, api_name="/edit")


def test_mounts_into_a_fastapi_app(pipe, clip_with_audio):
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI
    from gradio_client import Client, handle_file

    from infer.serve import build_app

    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    app = gr.mount_gradio_app(app, build_app(pipe, examples=False), path="/editor")
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    import threading
    import time

    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + HANG_GUARD
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    try:
        import urllib.request

        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read() == b'{"ok":true}'
        client = Client(f"http://127.0.0.1:{port}/editor/", verbose=False)
        _, downloaded = client.predict(handle_file(str(clip_with_audio)), "make it red", 7.5, 1.2, 1, False,
                                       False, 0, 32, api_name="/edit")
        path = downloaded if isinstance(downloaded, str) else downloaded["path"]
        assert look(Path(path))["frames"] == 12
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_serve_with_a_model_that_does_not_load_is_one_line(tmp_path):
    (tmp_path / "broken").mkdir()
    proc = subprocess.run([sys.executable, "-m", "infer", "serve", "--model", str(tmp_path / "broken"), "--port",
                           str(free_port())], capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 2
    assert proc.stderr.startswith("infer: error: could not load the editor") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_serves_the_shapes_editor_folder(tmp_path, clip_with_audio):
    """The pixel-space shapes editor (the one `make demo` trains, here untrained) loads and edits
    through the page's path, at its own 16 px working size."""
    from gradio_client import Client, handle_file

    from infer.serve import build_app, launch, load_pipeline
    from model import load_editor

    load_editor(str(ROOT / "configs/model/shapes-pixel.yaml")).save_pretrained(tmp_path / "shapes")
    pipe = load_pipeline(str(tmp_path / "shapes"))
    app = build_app(pipe, examples=False)
    port = free_port()
    launch(app, "127.0.0.1", port, block=False)
    try:
        _, downloaded = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            handle_file(str(clip_with_audio)), "make the square red", 1.5, 1.0, 2, True, True, 0,
            pipe.editor.resolution, api_name="/edit")
    finally:
        app.close()
    path = downloaded if isinstance(downloaded, str) else downloaded["path"]
    seen = look(Path(path))
    assert seen["frames"] == 12 and seen["size"] == (24, 16)  # the short side at the editor's 16 px


def test_one_edit_at_a_time_the_others_wait_in_the_queue(pipe, clip_with_audio, monkeypatch):
    import threading
    import time

    from gradio_client import Client, handle_file

    import infer.serve as serve

    active, most, lock = [0], [0], threading.Lock()
    real = serve.edit_file

    def watched(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.5)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(serve, "edit_file", watched)
    app = serve.build_app(pipe, examples=False)
    port = free_port()
    serve.launch(app, "127.0.0.1", port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        jobs = [client.submit(handle_file(str(clip_with_audio)), "make it red", 7.5, 1.2, 1, False, False, seed, 32,
                              api_name="/edit") for seed in range(3)]
        results = [job.result(timeout=HANG_GUARD) for job in jobs]
    finally:
        app.close()
    assert len(results) == 3 and most[0] == 1


# ---------------------------------------------------------------- what an upload may cost
def editing(pipe, **limits):
    from infer.serve import Editing, Limits

    return Editing(pipe, limits=Limits(**{"max_seconds": 5, **limits}))


def edit_with(ed, path, resolution=32):
    return ed(str(path), "make it red", 7.5, 1.2, 1, True, False, 0, resolution)


def test_a_thin_video_cannot_make_an_enormous_working_frame(pipe, tmp_path):
    thin = write_input(tmp_path / "thin.mp4", [np.full((16, 4096, 3), 90, np.uint8)] * 2, rate=8)
    assert thin.stat().st_size < 20_000
    ed = editing(pipe)
    with pytest.raises(ValueError, match=r"working frame would be 262144x1024 .* the limit is 2,088,960 pixels"):
        edit_with(ed, thin, resolution=1024)
    assert not list(ed.out_dir.glob("*.edited-*"))
    proc = subprocess.run([sys.executable, "-m", "infer", "edit", str(thin), "--prompt", "x", "--resolution", "1024",
                           "-o", str(tmp_path / "out.mp4")], capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("infer: error: the working frame would be 262144x1024")
    assert not (tmp_path / "out.mp4").exists()


def raw_h264(path: Path, frames: int, rate: int) -> Path:
    """An H.264 elementary stream (no container, no duration), named as the caller likes."""
    import av

    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height = stream.width = 16
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pattern(i, 16, 16), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_length_is_measured_not_taken_from_the_container(pipe, tmp_path):
    from infer.video import count_frames, probe_video

    raw = raw_h264(tmp_path / "raw.mp4", 400, 8)  # 400 frames, named .mp4
    info = probe_video(raw)
    assert info.seconds == 0  # the container states nothing
    # a raw stream has no clock of its own: its length is its frames at the rate it is edited at
    assert count_frames(raw) == (400, 400 / float(info.fps))
    with pytest.raises(ValueError, match=r"is \d+\.\d s long; this page edits videos of at most 5 s"):
        edit_with(editing(pipe), raw)
    fast = write_input(tmp_path / "fast.mp4", [pattern(i, 16, 16) for i in range(200)], rate=50)  # 200 frames in 4 s
    with pytest.raises(ValueError, match="more than 100 frames; this page edits at most 100"):
        edit_with(editing(pipe, max_frames=100), fast)


def test_any_container_and_extension_is_edited_without_an_ffmpeg_executable(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no ffmpeg, whatever the machine has
    ed = editing(pipe)
    frames = [pattern(i, 32, 48) for i in range(6)]
    for name, fmt in (("clip.mkv", "matroska"), ("CLIP.MP4", "mp4"), ("clip.MOV", "mov")):
        path = write_input(tmp_path / name, frames, rate=8, fmt=fmt)
        played, _ = edit_with(ed, path)
        assert look(Path(played))["frames"] == 6, name
    ed.close()
    assert not ed.out_dir.exists()


def test_page_errors_show_no_server_paths(pipe, tmp_path):
    fake = tmp_path / "deep" / "folder" / "notes.mp4"
    fake.parent.mkdir(parents=True)
    fake.write_text("not a video")
    with pytest.raises(ValueError) as err:
        edit_with(editing(pipe), fake)
    assert "notes.mp4" in str(err.value) and str(tmp_path) not in str(err.value)


def test_login_upload_size_queue_and_cleanup(pipe, clip_with_audio, monkeypatch):
    import urllib.request

    from gradio_client import Client, handle_file

    from infer.serve import Limits, build_app, launch, parse_auth

    monkeypatch.setenv("INSV2V_SERVE_AUTH", "ada:s3cret")
    auth = parse_auth(None)
    assert auth == ("ada", "s3cret") and parse_auth("bob:pw") == ("bob", "pw")
    with pytest.raises(ValueError, match="must be user:password"):
        parse_auth("nopassword")
    app = build_app(pipe, examples=False, limits=Limits(max_seconds=5, max_queue=3, max_file_size="1mb"))
    port = free_port()
    launch(app, "127.0.0.1", port, block=False, auth=auth)
    folder = app.editing.out_dir
    try:
        assert app._queue.max_size == 3 and app.max_file_size == 1024 * 1024
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=30)
        assert denied.value.code == 401
        client = Client(f"http://127.0.0.1:{port}/", auth=auth, verbose=False)
        _, downloaded = client.predict(handle_file(str(clip_with_audio)), "make it red", 7.5, 1.2, 1, False, False, 0,
                                       32, api_name="/edit")
        assert look(Path(downloaded if isinstance(downloaded, str) else downloaded["path"]))["frames"] == 12
        assert list(folder.glob("*.edited-*"))
    finally:
        app.close()
    assert not folder.exists()  # the page's own outputs go with it
