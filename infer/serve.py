"""`infer serve`: a Gradio page (and its HTTP API) that edits uploaded videos with a trained editor."""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .edit_file import edit_file
from .pipeline import MAX_WORKING_PIXELS, InsV2VPipeline, check_working_size, working_size
from .placement import compute_device, dtype_named
from .video import MAX_FRAME_PIXELS, VideoError, count_frames, encode_video, probe_video

MAX_SECONDS = 60.0
AUTH_ENV = "INSV2V_SERVE_AUTH"  # user:password, when --auth is not given


@dataclass(frozen=True)
class Limits:
    """What one upload may cost, all checked before a frame is edited: its length in seconds (from
    the packets' timestamps, not the container's word) and frames, its stored frame size, the
    working frame the edit runs at, the upload's bytes, and the edits waiting in the queue."""

    max_seconds: float = MAX_SECONDS
    max_frames: int = 1800
    max_source_pixels: int = MAX_FRAME_PIXELS
    max_working_pixels: int = MAX_WORKING_PIXELS
    max_file_size: str = "200mb"
    max_queue: int = 16
    keep_outputs_s: int = 3600  # edited files older than this are deleted


def without_paths(message: str) -> str:
    """``message`` with every absolute path cut to its file name: the page never shows server paths."""
    return re.sub(r"(?:[A-Za-z]:)?[/\\](?:[^\s/\\:'\"()]+[/\\])+([^\s/\\:'\"()]*)", r"\1", message)


def example_videos(folder: Path) -> list[Path]:
    """Small generated clips the page offers as examples (no video ships with the package)."""
    folder.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:96, 0:96]
    out = []
    for name, colour in (("blue-square", (40, 60, 220)), ("green-square", (40, 200, 80))):
        frames = np.empty((16, 96, 96, 3), np.uint8)
        for t in range(16):
            frames[t] = np.stack([xs * 2, ys * 2, np.full_like(xs, 90)], -1)
            x = 10 + 4 * t
            frames[t, 30:60, x : x + 30] = colour
        path = folder / f"{name}.mp4"
        path.write_bytes(encode_video(frames, 8))
        out.append(path)
    return out


class Editing:
    """What the page calls: one edit of an uploaded file, every expected failure one clear message.
    Its outputs live in ``out_dir`` (a fresh temporary folder unless given), pruned as they age and
    removed with :meth:`close`."""

    def __init__(self, pipe: InsV2VPipeline, max_seconds: float = MAX_SECONDS, out_dir: Path | None = None,
                 limits: Limits | None = None):
        self.pipe = pipe
        self.limits = limits or Limits(max_seconds=float(max_seconds))
        self.max_seconds = self.limits.max_seconds
        self.owns_out_dir = out_dir is None
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="insv2v-serve-"))

    def close(self) -> None:
        if self.owns_out_dir:
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def _prune(self) -> None:
        cutoff = time.time() - self.limits.keep_outputs_s
        for path in self.out_dir.glob("*.edited-*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass

    def __call__(self, video: str | None, instruction: str, text_guidance: float, video_guidance: float, steps: int,
                 lvsc: bool, motion_compensation: bool, seed: int, resolution: int) -> tuple[str, str]:
        """The edited mp4's path (to play and to download)."""
        if not video:
            raise ValueError("upload a video first (or pick an example)")
        if not instruction or not instruction.strip():
            raise ValueError("type an instruction, e.g. “make it snowy”")
        limits = self.limits
        try:
            info = probe_video(video, max_pixels=limits.max_source_pixels)
            height, width = working_size(info.height, info.width, int(resolution), multiple=self.pipe.editor.size_multiple)
            check_working_size(height, width, limits.max_working_pixels)
            # measured from the packets: a container may state no duration, or a false one
            frames, seconds = count_frames(video, stop_after=limits.max_frames)
        except VideoError as err:
            raise ValueError(f"this file is not a video this page can read ({without_paths(str(err))})") from None
        if seconds > limits.max_seconds:
            raise ValueError(f"the video is {seconds:.1f} s long; this page edits videos of at most {limits.max_seconds:g} s")
        if frames > limits.max_frames:
            raise ValueError(f"the video has more than {limits.max_frames} frames; this page edits at most {limits.max_frames}")
        settings = self.pipe.settings(instruction.strip(), num_inference_steps=int(steps), text_guidance=float(text_guidance),
                                      video_guidance=float(video_guidance), lvsc=0.5 if lvsc else 0.0,
                                      motion_compensation=bool(motion_compensation), resolution=int(resolution))
        settings.validate()
        self._prune()
        output = self.out_dir / f"{Path(video).stem}.edited-{uuid.uuid4().hex[:8]}.mp4"
        generator = torch.Generator().manual_seed(int(seed))
        try:
            edit_file(self.pipe, Path(video), output, info, settings, generator, progress=True, total_frames=frames,
                      max_frames=limits.max_frames, warn=lambda w: None)
        except VideoError as err:
            raise ValueError(f"the edit failed: {without_paths(str(err))}") from None
        return str(output), str(output)


def build_app(pipeline: InsV2VPipeline, max_seconds: float = MAX_SECONDS, title: str = "InsV2V video editor",
              examples: bool = True, limits: Limits | None = None):
    """The page as ``gradio.Blocks``: launch it, or mount it into a FastAPI app with
    ``gradio.mount_gradio_app(app, build_app(pipe), path="/edit")``. One edit runs at a time (the
    queue, of at most ``limits.max_queue`` waiting, shows the others their place); its API endpoint
    is ``/edit``. Uploads are any container PyAV reads (no ``ffmpeg`` executable is used); Gradio's
    copies of uploads and outputs are deleted after an hour, the page's own folder on close."""
    import gradio as gr

    limits = limits or Limits(max_seconds=float(max_seconds))
    max_seconds = limits.max_seconds
    editing = Editing(pipeline, limits=limits)
    defaults = pipeline.settings("x")

    def run(video, instruction, text_guidance, video_guidance, steps, lvsc, mc, seed, resolution,
            progress=gr.Progress(track_tqdm=True)):
        try:
            return editing(video, instruction, text_guidance, video_guidance, steps, lvsc, mc, seed, resolution)
        except ValueError as err:
            raise gr.Error(without_paths(str(err).splitlines()[0]), print_exception=False) from None
        except Exception as err:  # unforeseen: the server log has the traceback, the page one line
            logging.getLogger(__name__).exception("edit failed")
            first = without_paths(str(err).splitlines()[0]) if str(err) else ""
            raise gr.Error(f"the edit failed: {type(err).__name__}: {first}", print_exception=False) from None

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, limits.keep_outputs_s)) as app:
        gr.Markdown(f"## {title}\nUpload a video, say how to change it, press **Edit**. "
                    f"Videos up to {max_seconds:g} s.")
        with gr.Row():
            # format=None: the upload is passed on as it is (Gradio would convert others with an ffmpeg executable)
            source = gr.Video(label="Source video", sources=["upload"], format=None, elem_id="source")
            edited = gr.Video(label="Edited video", interactive=False, elem_id="edited")
        instruction = gr.Textbox(label="Instruction", placeholder="make it snowy", elem_id="instruction")
        button = gr.Button("Edit", variant="primary", elem_id="edit")
        download = gr.File(label="Download the edit (mp4, with the source's audio)", interactive=False, elem_id="download")
        with gr.Accordion("advanced", open=False):
            with gr.Row():
                text_guidance = gr.Slider(1.0, 15.0, value=defaults.text_guidance, step=0.5, label="text guidance")
                video_guidance = gr.Slider(1.0, 3.0, value=defaults.video_guidance, step=0.1, label="video guidance")
                steps = gr.Slider(1, 100, value=defaults.num_inference_steps, step=1, label="steps")
            with gr.Row():
                lvsc = gr.Checkbox(value=True, label="long video sampling correction")
                mc = gr.Checkbox(value=False, label="motion compensation")
                seed = gr.Number(value=0, precision=0, label="seed")
                resolution = gr.Slider(16, 1024, value=pipeline.editor.resolution, step=16, label="resolution (short side)")
        inputs = [source, instruction, text_guidance, video_guidance, steps, lvsc, mc, seed, resolution]
        if examples:
            clips = example_videos(editing.out_dir / "examples")
            gr.Examples([[str(clips[0]), "make the square red"], [str(clips[1]), "make it snowy"]], [source, instruction])
        button.click(run, inputs, [edited, download], api_name="edit")
    app.queue(default_concurrency_limit=1, max_size=limits.max_queue)
    app.max_file_size_limit = limits.max_file_size  # read by launch()
    app.editing = editing
    close = app.close

    def close_and_clean(*args, **kwargs):  # the page's own folder goes with the server
        try:
            return close(*args, **kwargs)
        finally:
            editing.close()

    app.close = close_and_clean
    atexit.register(editing.close)
    return app


def load_pipeline(model: str | None, device: str | None = None, dtype: str | None = None) -> InsV2VPipeline:
    """The editor ``infer serve`` shows: a folder, a ``.ckpt``, or the tiny random one."""
    pipe = InsV2VPipeline.load(model)
    return pipe.to(compute_device(device), dtype_named(dtype))


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``user:password`` (``--auth``, else $INSV2V_SERVE_AUTH) as Gradio's auth pair; None when neither is set."""
    value = value if value is not None else os.environ.get(AUTH_ENV)
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not (sep and user and password):
        raise ValueError(f"--auth (or ${AUTH_ENV}) must be user:password")
    return user, password


def launch(app: Any, host: str, port: int, block: bool = True, auth: tuple[str, str] | None = None):
    """Serve ``app`` on ``host:port``; with ``block=False`` return once it listens."""
    return app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                      quiet=True, share=False, inbrowser=False, auth=auth,
                      max_file_size=getattr(app, "max_file_size_limit", None))
