"""Video in: intake limits and refusals, the lite tracker on a generated clip, best-view choice, and whole runs
(plain and as the image-to-3d flow) that write frame.png, track.webp and result.json's video section."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam3d_pipeline.backends.lite_segmenter import LiteSegmenter
from sam3d_pipeline.errors import InvalidVideoError, VideoTooLargeError
from sam3d_pipeline.masks import iou
from sam3d_pipeline.run import pipeline
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.types import SegmentRequest
from sam3d_pipeline.video import is_video_uri, load_video, read_frame_folder
from sam3d_pipeline.video.views import VideoRun, best_views, score_views

from .clips import audio_only, encode, moving_object, zero_frames

FAST_S = 2.0  # a refusal takes less than this (the whole clip is a few kB)


@pytest.fixture(scope="module")
def clip():
    return moving_object(240, blur=(20, 34))


@pytest.fixture(scope="module")
def mp4(clip):
    return encode(clip.frames, "mp4")


@pytest.fixture(scope="module")
def tracked(clip, mp4):
    video = load_video(mp4, source="clip.mp4", settings=Settings())
    track = LiteSegmenter(Settings()).track([f.rgb for f in video.frames], SegmentRequest("red disc"))
    return video, track


def _options(**kwargs):
    return pipeline.RunOptions(prompt="red disc", segmenter="lite", reconstructor="lite", export=["glb"], **kwargs)


# Intake ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mp4", "mov", "webm"])
def test_every_container_decodes_every_frame_in_order(clip, fmt):
    video = load_video(encode(clip.frames[:30], fmt), source=f"clip.{fmt}", settings=Settings())
    assert video.frames_read == 30 and len(video.frames) == 30 and video.stride == 1
    assert [f.index for f in video.frames] == list(range(30))
    assert video.frames[0].rgb.shape == (72, 96, 3) and video.frames[0].rgb.dtype == np.uint8
    times = [f.time_s for f in video.frames]
    assert times == sorted(times) and times[10] == pytest.approx(10 / 30, abs=0.02)
    # colours survive the codec: the disc is red where the truth says so
    assert video.frames[5].rgb[clip.truth[5]].mean(0)[0] > 150


def test_sampling_stays_under_the_frame_cap(mp4):
    video = load_video(mp4, source="clip.mp4", settings=Settings(video_max_frames=50))
    assert video.frames_read == 240
    assert len(video.frames) <= 50 and video.stride == 5
    assert all(f.index % 5 == 0 for f in video.frames)
    strided = load_video(mp4, source="clip.mp4", settings=Settings(video_stride=7))
    assert [f.index for f in strided.frames][:3] == [0, 7, 14]


def _refused(data, error, words, settings=None):
    started = time.perf_counter()
    with pytest.raises(error) as info:
        load_video(data, source="upload.mp4", settings=settings or Settings())
    assert time.perf_counter() - started < FAST_S
    message = str(info.value)
    assert message.startswith("upload.mp4: ")
    for word in words:
        assert word in message
    return message


def test_truncated_files_are_refused_with_the_reason(mp4, clip):
    _refused(mp4[: len(mp4) // 2], InvalidVideoError, ["truncated", "'mdat' box"])
    webm = encode(clip.frames[:60], "webm")
    _refused(webm[: len(webm) // 2], InvalidVideoError, ["truncated"])


def test_zero_frame_and_audio_only_files_are_refused():
    _refused(zero_frames("mp4"), InvalidVideoError, ["zero-frame"])
    _refused(zero_frames("webm"), InvalidVideoError, ["zero-frame"])
    _refused(audio_only(), InvalidVideoError, ["audio only"])
    _refused(b"", InvalidVideoError, ["empty"])
    _refused(b"plain text, not a video at all", InvalidVideoError, ["not a recognised video format"])


def test_clips_over_the_limits_are_refused_before_decoding(mp4):
    _refused(mp4, VideoTooLargeError, ["8.0 s", "SAM3D_VIDEO_MAX_SECONDS", "before decoding"],
             Settings(video_max_seconds=5))
    _refused(mp4, VideoTooLargeError, ["96x72", "SAM3D_VIDEO_MAX_PIXELS"], Settings(video_max_pixels=96 * 71))


def test_a_refused_video_leaves_nothing_behind(tmp_path, mp4):
    out = tmp_path / "out"
    for name, data in (("cut.mp4", mp4[: len(mp4) // 3]), ("sound.mp4", audio_only()), ("long.mp4", mp4)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises((InvalidVideoError, VideoTooLargeError)):
            pipeline.run_plain(str(path), _options(), str(out), Settings(video_max_seconds=5))
    assert not out.exists() or not any(out.rglob("*"))


# Tracking and the best view -----------------------------------------------------------------------------------


def test_lite_track_follows_the_object_out_of_the_frame_and_back(clip, tracked):
    video, track = tracked
    assert len(track.masks) == 240 and track.found_at == 0
    full = max(int(t.sum()) for t in clip.truth)
    for i, (mask, truth) in enumerate(zip(track.masks, clip.truth, strict=True)):
        if clip.absent(i):
            assert not mask.any(), f"frame {i}: the object is out of view but the track holds {mask.sum()} px"
        elif truth.sum() >= 0.6 * full:  # motion blur smears the outline 4 px either way
            floor = 0.5 if i in clip.blurred else 0.7
            assert iou(mask, truth) > floor, f"frame {i}: IoU {iou(mask, truth):.2f}"
    assert any("lost the object" in m for m in track.messages)
    assert any("found the object again" in m for m in track.messages)
    assert "previous frame's mask" in " ".join(track.backend.limits)


def test_the_chosen_view_shows_the_whole_object_sharply(clip, tracked):
    video, track = tracked
    views = score_views(video, track)
    [best] = best_views(views, 1)
    assert clip.whole(best.index) and best.index not in clip.blurred
    assert not best.touches and best.view_score > 0
    top = best_views(views, 5)
    assert [v.view_score for v in top] == sorted((v.view_score for v in top), reverse=True)
    # a frame cut by the edge or blurred scores below a whole, sharp one of the same area
    edge = next(v for v in views if v.touches and v.area > 0.6 * best.area)
    blurred = [v for v in views if v.index in clip.blurred and clip.whole(v.index)]
    assert edge.view_score < best.view_score and all(v.sharpness < 0.9 for v in blurred)
    assert all(v.view_score == 0.0 for v in views if v.area == 0)
    section = VideoRun(video, track, views, [best]).section()
    assert section["frames_read"] == 240 and section["frames_sampled"] == 240
    assert section["chosen"]["index"] == best.index and len(section["frames"]) == 240


# Whole runs ---------------------------------------------------------------------------------------------------


def test_plain_run_on_a_video_completes_with_lite(tmp_path, clip, mp4):
    path = tmp_path / "turntable.mp4"
    path.write_bytes(mp4)
    assert is_video_uri(str(path))
    result = pipeline.run_plain(str(path), _options(), str(tmp_path / "out"))
    assert result.status == "completed", result.error
    prefix = Path(result.output_prefix)
    assert prefix.name.startswith("turntable-")
    assert {"frame.png", "track.webp", "mask.png", "object.glb", "result.json"} <= {p.name for p in prefix.iterdir()}
    chosen = result.video["chosen"]
    assert clip.whole(chosen["index"]) and chosen["index"] not in clip.blurred
    assert chosen["time_s"] == pytest.approx(chosen["index"] / 30, abs=0.02)
    assert result.video["frames_tracked"] >= 150 and result.video["tracker"] == "lite@grabcut-1"
    frame = Image.open(prefix / "frame.png")
    assert frame.text["frame_index"] == str(chosen["index"]) and frame.size == (96, 72)
    mask = np.asarray(Image.open(prefix / "mask.png")) > 127
    assert iou(mask, clip.truth[chosen["index"]]) > 0.8
    track = Image.open(prefix / "track.webp")
    assert track.is_animated and track.n_frames == 120
    on_disk = json.loads((prefix / "result.json").read_text())
    assert on_disk["video"]["chosen"] == chosen and on_disk["input"]["uri"] == str(path)
    assert set(result.outputs) >= {"frame.png", "track.webp"}


def test_video_frames_k_keeps_the_best_view_when_the_reconstructor_gives_no_score(tmp_path, mp4):
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4)
    one = pipeline.run_plain(str(path), _options(), str(tmp_path / "out"))
    three = pipeline.run_plain(str(path), _options(video_frames=3), str(tmp_path / "out"))
    assert one.output_prefix != three.output_prefix  # the option is part of the output key
    candidates = three.video["candidates"]
    assert len(candidates) == 3 and three.video["chosen"]["index"] == candidates[0]["index"]
    assert len({c["index"] for c in candidates}) == 3 and len(one.video["candidates"]) == 1
    assert any("does not score its output" in m for m in three.messages)


def test_a_folder_of_frames_is_a_video(tmp_path, clip):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(0, 240, 4):
        Image.fromarray(clip.frames[i]).save(folder / f"f{i}.png")  # natural order: f8 before f12
    manifest = read_frame_folder(str(folder), Settings())
    video = load_video(manifest, source=str(folder), settings=Settings())
    assert video.frames_read == 60 and video.format == "frames"
    assert np.array_equal(video.frames[3].rgb, clip.frames[12])
    result = pipeline.run_plain(str(folder), _options(), str(tmp_path / "out"))
    assert result.status == "completed" and result.video["frames_sampled"] == 60
    first = result.output_prefix
    Image.fromarray(clip.frames[1]).save(folder / "f0.png")  # one frame changed: a different input
    assert pipeline.run_plain(str(folder), _options(), str(tmp_path / "out")).output_prefix != first
    with pytest.raises(VideoTooLargeError, match="SAM3D_VIDEO_MAX_SECONDS"):
        read_frame_folder(str(folder), Settings(video_max_seconds=1))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidVideoError, match="no image files"):
        read_frame_folder(str(empty), Settings())


def test_s3_video_and_s3_prefix_of_frames(tmp_path, s3, clip, mp4):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="uploads/spin.mp4", Body=mp4)
    for i in range(0, 120, 6):
        buf = io.BytesIO()
        Image.fromarray(clip.frames[i]).save(buf, format="PNG")
        client.put_object(Bucket=bucket, Key=f"uploads/spin-frames/{i:04d}.png", Body=buf.getvalue())
    client.put_object(Bucket=bucket, Key="uploads/spin-frames/notes.txt", Body=b"not a frame")
    out = f"s3://{bucket}/outputs"
    result = pipeline.run_plain(f"s3://{bucket}/uploads/spin.mp4", _options(), out)
    assert result.status == "completed" and result.video["frames_read"] == 240
    assert result.outputs["frame.png"] == f"{result.output_prefix}/frame.png"
    frames = pipeline.run_plain(f"s3://{bucket}/uploads/spin-frames/", _options(), out)
    assert frames.status == "completed" and frames.video["frames_read"] == 20
    assert frames.video["format"] == "frames"


def test_track_webp_marks_the_chosen_frame(tracked):
    video, track = tracked
    views = score_views(video, track)
    from sam3d_pipeline.video.outputs import track_webp

    data = track_webp(VideoRun(video, track, views, best_views(views)), max_frames=10, max_side_px=48)
    image = Image.open(io.BytesIO(data))
    assert image.is_animated and image.size == (48, 36) and image.n_frames == 10


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_flow_runs_a_video_end_to_end(tmp_path, clip):
    from flows.image_to_3d import image_to_3d

    path = tmp_path / "clip.webm"
    path.write_bytes(encode(clip.frames[:90:2], "webm"))
    state = image_to_3d(image=str(path), prompt="red disc", output_root=str(tmp_path / "out"), segmenter="lite",
                        reconstructor="lite", export=["glb"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["status"] == "completed" and result["video"]["frames_sampled"] == 45
    assert {"frame.png", "track.webp"} <= set(result["outputs"])


@pytest.mark.slow
def test_sam3_random_init_tracks_a_two_frame_clip_through_the_video_predictor(tmp_path, clip):
    """The real predictor (random weights, CPU): start_session, add_prompt, propagate_in_video, close_session.
    Random weights find nothing real, so this checks the plumbing, the marking and that nothing is kept."""
    pytest.importorskip("sam3")
    import tempfile

    from sam3d_pipeline.backends.sam3 import video as sam3_video

    settings = Settings(sam3_random_init=True)
    path = tmp_path / "two.mp4"  # two frames: one detected, one propagated to (each costs minutes on this CPU)
    path.write_bytes(encode(clip.frames[:20:10], "mp4"))
    leftovers = set(Path(tempfile.gettempdir()).glob("sam3d-frames-*"))
    options = pipeline.RunOptions(prompt="red disc", segmenter="sam3", reconstructor="lite", export=["glb"])
    result = pipeline.run_plain(str(path), options, str(tmp_path / "out"), settings)
    assert result.status in ("completed", "no_object")
    assert result.segmenter["name"] == "sam3" and result.segmenter["weights"] == "random-init"
    assert result.video["frames_sampled"] == 2 and result.video["tracker"].startswith("sam3@")
    assert len(result.video["frames"]) == 2
    assert all(0.0 <= f["score"] <= 1.0 for f in result.video["frames"])
    assert any("random weights" in m for m in result.messages)
    assert any(m.startswith("timings_s start_session=") for m in result.messages)
    assert {"frame.png", "track.webp", "result.json"} <= set(result.outputs)
    [loaded] = sam3_video._PREDICTORS.values()
    assert loaded.predictor._ALL_INFERENCE_STATES == {}  # the session was closed
    assert set(Path(tempfile.gettempdir()).glob("sam3d-frames-*")) == leftovers  # the JPEG folder is gone


def test_a_reviewer_pick_becomes_the_photo_and_its_tracked_mask(tracked):
    from sam3d_pipeline.review.machine import ReviewOutcome, apply_review
    from sam3d_pipeline.run import finish
    from sam3d_pipeline.video.outputs import frame_png, view_overlay_png

    video, track = tracked
    views = score_views(video, track)
    run = VideoRun(video, track, views, best_views(views, 2))
    record = finish.RunRecord(input_uri="clip.mp4", options=_options(video_frames=2))
    pipeline.start_from_video(record, run)
    offered = run.review_views(3)
    assert offered == best_views(views, 3) and offered[0] == run.chosen
    picked = offered[2]
    apply_review(record, ReviewOutcome("approved", record.seg, None, record.options, frame=picked.index))
    assert (run.chosen, run.chosen_by, record.selected) == (picked, "reviewer", 0)
    assert np.array_equal(record.image.rgb, video.frames[picked.position].rgb)
    assert np.array_equal(record.seg.instances[0].mask, track.masks[picked.position])
    assert run.section()["chosen"] == {"index": picked.index, "time_s": round(picked.time_s, 3),
                                      "view_score": round(picked.view_score, 4), "chosen_by": "reviewer"}
    assert Image.open(io.BytesIO(frame_png(run))).text["frame_index"] == str(picked.index)
    assert record.messages[-1].startswith(f"video: the reviewer picked frame {picked.index} ")
    assert Image.open(io.BytesIO(view_overlay_png(run, picked, max_side_px=48))).size == (48, 36)
    worst = min((v for v in views if v.area), key=lambda v: v.view_score)
    assert VideoRun(video, track, views, [worst]).review_views(3)[-1] == worst  # the shown frame is always offered
