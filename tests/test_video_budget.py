"""Video intake budgets hold on the decoded frames, not only on what the header says.

A raw H.264 stream (named ``.mp4``, as an attacker would) that starts with small frames and switches to large
ones has a header that states only the small size: intake must refuse it at the first frame of another size,
before converting (or, past ``SAM3D_VIDEO_MAX_PIXELS``, before the decoder even allocates) the large frames.
"""

from __future__ import annotations

import io
import time
import tracemalloc

import av
import pytest

from sam3d_pipeline.errors import InputError, InvalidVideoError, VideoTooLargeError
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.video import intake, load_video

from .clips import encode, moving_object, size_switch

FAST_S = 5.0
BIG = 1024  # the large frames: 1024x1024 RGB = 3 MiB each
BIG_RGB_BYTES = BIG * BIG * 3


@pytest.fixture(scope="module")
def hostile():
    """10 frames of 64x48, then 8 frames of 1024x1024, in one raw H.264 stream."""
    data = size_switch((10, 64, 48), (8, BIG, BIG))
    with av.open(io.BytesIO(data)) as container:  # the premise: what the header states is the small size
        context = container.streams.video[0].codec_context
        assert (context.width, context.height) == (64, 48)
    return data


def _refuse(data, error, settings):
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(error) as info:
            load_video(data, source="upload.mp4", settings=settings)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < FAST_S
    return str(info.value), peak


def test_a_frame_size_change_mid_stream_is_refused_at_that_frame(hostile):
    message, peak = _refuse(hostile, InvalidVideoError, Settings())
    assert message.startswith("upload.mp4: ")
    assert "frame 10" in message and "1024x1024" in message and "64x48" in message
    # no large frame was converted to RGB or kept: the whole load held less than one of them
    assert peak < BIG_RGB_BYTES, f"peak {peak:,} bytes traced"


@pytest.mark.parametrize("limit", [512 * 512, 800 * 800])  # the decoder refuses to allocate it / decodes it
def test_a_frame_over_the_pixel_limit_is_refused_though_the_header_is_small(hostile, limit):
    message, peak = _refuse(hostile, VideoTooLargeError, Settings(video_max_pixels=limit))
    assert isinstance(VideoTooLargeError("x"), InputError)
    assert "frame 10" in message and "1024x1024" in message and "SAM3D_VIDEO_MAX_PIXELS" in message
    assert peak < BIG_RGB_BYTES, f"peak {peak:,} bytes traced"


def test_frames_kept_never_exceed_the_memory_budget(monkeypatch):
    frames = moving_object(40).frames  # 96x72: 20,736 bytes of RGB each
    monkeypatch.setattr(intake, "FRAME_MEMORY_BUDGET_BYTES", 96 * 72 * 3 * 7)
    video = load_video(encode(frames, "mp4"), source="clip.mp4", settings=Settings())
    assert 1 <= len(video.frames) <= 7
    assert sum(f.rgb.nbytes for f in video.frames) <= intake.FRAME_MEMORY_BUDGET_BYTES
    assert {f.rgb.shape for f in video.frames} == {(72, 96, 3)}


def test_a_decoder_runtime_error_is_an_input_error(monkeypatch):
    def broken(frame):
        raise RuntimeError("ERROR adding frame: Invalid frame dimensions")

    monkeypatch.setattr(intake, "_frame_rgb", broken)
    with pytest.raises(InvalidVideoError) as info:
        load_video(encode(moving_object(6).frames, "mp4"), source="upload.mp4", settings=Settings())
    message = str(info.value)
    assert message.startswith("upload.mp4: ") and "frame 0" in message and "Invalid frame dimensions" in message


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_a_clip_exactly_at_the_pixel_limit_still_decodes(fmt):
    # 100 px wide: FFmpeg's own pixel cap counts it padded to 128, so the decoder's cap needs headroom
    frames = moving_object(4, width=100, height=100).frames
    video = load_video(encode(frames, fmt), source=f"clip.{fmt}", settings=Settings(video_max_pixels=100 * 100))
    assert video.frames_read == 4 and (video.width, video.height) == (100, 100)
