"""Editing videos: sampling math, InsV2VPipeline, video I/O and the `infer` command."""

from .flow import clip_flows, optical_flow, resize_flow
from .pipeline import EditOutput, EditSettings, InsV2VPipeline, working_size
from .sampling import (
    Clip,
    clip_plan,
    from_epsilon,
    guided_noise,
    guidance_weights,
    lvsc_correct,
    lvsc_correct_warped,
    predicted_sample,
    reference_noise,
    stream_clips,
    to_epsilon,
    warp,
)
from .video import (
    VideoError,
    VideoInfo,
    VideoReader,
    decode_video,
    encode_video,
    iter_frames,
    probe_video,
    read_video,
)
from .video_writer import OUTPUT_FORMATS, VideoWriter, write_video

__all__ = [
    "Clip",
    "EditOutput",
    "EditSettings",
    "InsV2VPipeline",
    "VideoError",
    "VideoInfo",
    "VideoReader",
    "OUTPUT_FORMATS",
    "VideoWriter",
    "clip_flows",
    "decode_video",
    "encode_video",
    "clip_plan",
    "from_epsilon",
    "guided_noise",
    "guidance_weights",
    "iter_frames",
    "lvsc_correct",
    "lvsc_correct_warped",
    "optical_flow",
    "predicted_sample",
    "probe_video",
    "read_video",
    "reference_noise",
    "resize_flow",
    "stream_clips",
    "to_epsilon",
    "warp",
    "working_size",
]
