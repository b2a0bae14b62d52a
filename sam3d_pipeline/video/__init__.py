"""Video in: decode a clip into a bounded sample of frames (``intake``), follow the prompted object through it
with the segmenter's tracker, score every tracked frame and choose the best view to reconstruct (``views``), and
draw what was tracked (``track.webp``, ``frame.png``: ``outputs``)."""

from sam3d_pipeline.video.intake import (
           FRAME_SUFFIXES,
           SAMPLING_SETTINGS,
           VIDEO_SUFFIXES,
           LoadedVideo,
           VideoFrame,
           is_frame_folder,
           is_frame_manifest,
           is_video_uri,
           load_video,
           read_clip,
           read_frame_folder,
           sampling,
           with_sampling,
)

__all__ = ["FRAME_SUFFIXES", "SAMPLING_SETTINGS", "VIDEO_SUFFIXES", "LoadedVideo", "VideoFrame", "is_frame_folder",
           "is_frame_manifest", "is_video_uri", "load_video", "read_clip", "read_frame_folder", "sampling",
           "with_sampling"]
