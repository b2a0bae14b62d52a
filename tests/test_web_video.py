"""Video through the job API: a clip uploaded (or named by URI) is checked with the run's own video intake before
any run exists, stored once under its content key, and runs to a job that lists the track and the chosen frame.

Fast tests (no Prefect): the intake's decisions and every refusal through the app in process. Stack tests (HTTP
only, on the session's local stack): a clip runs to a completed job; bad clips create nothing.
"""

from __future__ import annotations

import hashlib
import io
import uuid

import pytest
import requests
from PIL import Image

from sam3d_pipeline.errors import ImageTooLargeError, InputError, InvalidVideoError, VideoTooLargeError
from sam3d_pipeline.keys import content_type
from sam3d_pipeline.settings import Settings
from sam3d_pipeline.storage import LocalStorage
from sam3d_pipeline.video import load_video
from sam3d_pipeline.web import jobs, uploads

from .clips import audio_only, encode, moving_object, raw_h264, zero_frames
from .photos import encode as encode_photo
from .photos import object_photo
from .stack import STACK_MAX_INPUT_BYTES


@pytest.fixture(scope="module")
def clip():
    return moving_object(60)


@pytest.fixture(scope="module")
def mp4(clip) -> bytes:
    return encode(clip.frames[::2], "mp4")  # 30 frames, 1 s, 96x72


@pytest.fixture(scope="module")
def webm(clip) -> bytes:
    return encode(clip.frames[::2], "webm")


# ---- the intake, in process ------------------------------------------------------------------------------------


def test_a_check_only_load_refuses_and_samples_as_the_run_does_with_no_pixels_kept(mp4):
    settings = Settings(video_max_frames=10)
    run = load_video(mp4, source="c.mp4", settings=settings)
    check = load_video(mp4, source="c.mp4", settings=settings, keep_pixels=False)
    assert check.describe() == run.describe()
    assert [f.index for f in check.frames] == [f.index for f in run.frames]
    assert all(f.rgb.shape == (72, 96, 3) and f.rgb.strides == (0, 0, 0) for f in check.frames)  # no pixels held


def test_clips_are_stored_under_their_content_key_with_the_real_container_extension(tmp_path, mp4, webm, clip):
    settings = Settings(output_root=str(tmp_path))
    storage = LocalStorage(tmp_path)
    mov = encode(clip.frames[::2], "mov")
    for data, name, extension, kind in ((mp4, "Turn Table.webm", ".mp4", "video/mp4"),
                                        (webm, "turn table.mp4", ".webm", "video/webm"),
                                        (mov, "turntable", ".mov", "video/quicktime")):
        intake = uploads.check_upload(data, name, storage, settings)
        digest = hashlib.sha256(data).hexdigest()
        assert intake.upload_key.startswith(f"_uploads/{digest}/") and intake.upload_key.endswith(extension)
        assert content_type(intake.upload_key) == kind
        assert intake.content_id == f"sha256:{digest}" and (intake.width, intake.height) == (96, 72)
        facts = intake.describe()
        assert facts["kind"] == "video" and facts["container"] == extension[1:]
        assert facts["frames_read"] == 30 and facts["duration_s"] == pytest.approx(1.0, abs=0.05)
    assert not any(tmp_path.rglob("*.*"))  # checking stores nothing
    uploads.store_upload(intake, mov, storage)
    uploads.store_upload(intake, mov, storage)  # the same bytes again: the same one file
    assert [p.read_bytes() for p in tmp_path.rglob("*.mov")] == [mov]
    photo = uploads.check_upload(encode_photo(object_photo(64, 48)[0]), "p.png", storage, settings)
    assert photo.video is None and photo.describe() == {"kind": "photo", "width": 64, "height": 48}


def test_every_clip_the_run_would_refuse_is_refused_with_its_reason(tmp_path, mp4, clip):
    settings = Settings(output_root=str(tmp_path), max_input_bytes=200_000, video_max_seconds=2)
    storage = LocalStorage(tmp_path)
    long_clip = encode(clip.frames * 2, "mp4")  # 4 s
    cases = [
        (mp4[: len(mp4) // 2], "cut.mp4", InvalidVideoError, "truncated"),
        (audio_only(), "sound.mp4", InvalidVideoError, "audio only"),
        (zero_frames("mp4"), "none.mp4", InvalidVideoError, "zero-frame"),
        (b"not a clip at all", "notes.mp4", InvalidVideoError, "not a recognised video format"),
        (raw_h264(clip.frames[:5]), "raw.mp4", InvalidVideoError, "not an MP4, MOV, M4V or WebM container"),
        (b"\x1a\x45\xdf\xa3\x01\x00matroska" + bytes(64), "film.mkv", InvalidVideoError, r"Matroska \(MKV\)"),
        (long_clip, "long.mp4", VideoTooLargeError, "SAM3D_VIDEO_MAX_SECONDS"),
        (b"\0\0\0\x18ftypisom" + bytes(200_000), "huge.mp4", ImageTooLargeError, "SAM3D_MAX_INPUT_BYTES=200,000"),
    ]
    for data, name, error, reason in cases:
        with pytest.raises(error, match=reason):
            uploads.check_upload(data, name, storage, settings)
    with pytest.raises(VideoTooLargeError, match="96x72 .*SAM3D_VIDEO_MAX_PIXELS"):
        uploads.check_upload(mp4, "wide.mp4", storage, Settings(output_root=str(tmp_path), video_max_pixels=5000))


def test_prompts_and_video_frames_are_checked_against_the_input(tmp_path, mp4):
    storage = LocalStorage(tmp_path)
    video = uploads.check_upload(mp4, "c.mp4", storage, Settings(output_root=str(tmp_path)))
    _, inside = jobs.parse_request({"prompt": "disc", "boxes": "[[10, 10, 90, 70]]", "video_frames": "3"})
    uploads.check_prompts(inside, video)
    _, outside = jobs.parse_request({"prompt": "disc", "boxes": "[[100, 10, 120, 70]]"})
    with pytest.raises(InputError, match="lies outside the 96x72 image"):
        uploads.check_prompts(outside, video)
    photo = uploads.check_upload(encode_photo(object_photo(64, 48)[0]), "p.png", storage, Settings())
    with pytest.raises(InputError, match="video_frames: 3 frames to try, but the input is a photo"):
        uploads.check_prompts(inside, photo)
    for value, reason in (("9", "less than or equal to 8"), ("0", "greater than or equal to 1"), ("x", "integer")):
        with pytest.raises(jobs.JobRequestError, match=f"video_frames: .*{reason}"):
            jobs.parse_request({"prompt": "disc", "video_frames": value})
    request, options = jobs.parse_request({"prompt": "disc", "video_frames": "3"})
    assert jobs.flow_parameters(request, "s3://b/c.mp4", "s3://b/out")["video_frames"] == 3
    assert "video_frames" not in jobs.flow_parameters(jobs.parse_request({"prompt": "disc"})[0], "x.png", "o")
    assert jobs.fingerprint(request, "u", "c") != jobs.fingerprint(jobs.parse_request({"prompt": "disc"})[0], "u", "c")


def test_video_uris_are_checked_as_the_run_reads_them(tmp_path, mp4, clip):
    settings = Settings(output_root=str(tmp_path / "out"), api_input_roots=str(tmp_path), video_max_seconds=2)
    (tmp_path / "good.mp4").write_bytes(mp4)
    intake = uploads.check_uri(str(tmp_path / "good.mp4"), settings)
    assert intake.video["container"] == "mp4" and intake.upload_key is None
    assert intake.content_id == f"sha256:{hashlib.sha256(mp4).hexdigest()}"
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, rgb in enumerate(clip.frames[:6]):
        Image.fromarray(rgb).save(frames / f"f{i}.png")
    folder = uploads.check_uri(str(frames), settings)
    assert folder.video["container"] == "frames" and folder.video["frames_read"] == 6
    (tmp_path / "cut.webm").write_bytes(mp4[:4000])
    with pytest.raises(InvalidVideoError, match="truncated"):
        uploads.check_uri(str(tmp_path / "cut.webm"), settings)
    (tmp_path / "long.mov").write_bytes(encode(clip.frames * 2, "mov"))
    with pytest.raises(VideoTooLargeError, match="SAM3D_VIDEO_MAX_SECONDS"):
        uploads.check_uri(str(tmp_path / "long.mov"), settings)


def test_the_app_refuses_bad_clips_before_prefect_and_says_a_clip_is_a_video(tmp_path, monkeypatch, mp4, clip):
    """In process, with no Prefect API: every refusal of a clip is made before a run could exist."""
    from fastapi.testclient import TestClient

    from sam3d_pipeline.web.app import create_app

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr("sam3d_pipeline.review.prefect_api.api_url", lambda: None)
    settings = Settings(output_root=str(tmp_path / "out"), max_input_bytes=100_000, video_max_seconds=2,
                        video_max_pixels=200 * 200, api_input_roots=str(tmp_path))
    client = TestClient(create_app(["tok"], settings, deliver_webhooks=False))
    auth = {"Authorization": "Bearer tok"}

    def submit(data: bytes, name: str, **fields):
        return client.post("/v1/jobs", headers=auth, files={"image": (name, data)}, data={"prompt": "disc"} | fields)

    wide = moving_object(4, width=240, height=180)
    (tmp_path / "long.mp4").write_bytes(encode(clip.frames * 2, "mp4"))
    cases = {
        "truncated": (submit(mp4[: len(mp4) // 2], "cut.mp4"), 422, "cut.mp4: truncated"),
        "audio only": (submit(audio_only(), "sound.mp4"), 422, "sound.mp4: audio only"),
        "too long": (submit(encode(clip.frames * 2, "mp4"), "long.mp4"), 422, "SAM3D_VIDEO_MAX_SECONDS"),
        "too many pixels": (submit(encode(wide.frames, "webm"), "wide.webm"), 422, "SAM3D_VIDEO_MAX_PIXELS"),
        "too big": (submit(b"\0\0\0\x18ftypisom" + bytes(100_000), "big.mp4"), 413, "SAM3D_MAX_INPUT_BYTES"),
        "box outside": (submit(mp4, "c.mp4", boxes="[[97, 0, 120, 10]]"), 422, "outside the 96x72 image"),
        "video_frames": (submit(mp4, "c.mp4", video_frames="9"), 422, "video_frames:"),
        "long uri": (client.post("/v1/jobs", headers=auth, json={"prompt": "disc",
                                                                  "image": str(tmp_path / "long.mp4")}),
                     422, "SAM3D_VIDEO_MAX_SECONDS"),
    }
    for what, (answer, status, reason) in cases.items():
        assert answer.status_code == status, (what, answer.text)
        assert reason in answer.json()["detail"], (what, answer.text)
    assert not (tmp_path / "out" / "_uploads").exists()  # nothing refused was stored
    # A good clip passes every check: with no Prefect API the answer is 503, the step after the checks.
    answer = submit(mp4, "c.mp4", video_frames="2")
    assert answer.status_code == 503 and "PREFECT_API_URL is not set" in answer.json()["detail"]


def test_the_job_json_says_what_the_input_is(tmp_path):
    intake = uploads.Intake(uri="s3://b/_uploads/x/c.mp4", content_id="sha256:x", width=96, height=72,
                            video={"container": "mp4", "format": "mov", "codec": "h264", "width": 96, "height": 72,
                                   "fps": 30.0, "duration_s": 1.0, "frames_read": 30, "frames_sampled": 30,
                                   "stride": 1})
    labels = jobs.input_labels(intake.describe())
    assert labels["sam3d.input.kind"] == "video" and labels["sam3d.input.frames_read"] == 30
    run = jobs.RunView(id="r", state_type="SCHEDULED", state_name="Scheduled", state_message=None, created_at="",
                       updated_at="", parameters={"image": intake.uri, "prompt": "disc"}, labels=labels)
    job = jobs.job_json(run, result=None, output_prefix=None, outputs={}, status_url="u", review_url=None,
                        attempts=[])
    assert job["input"] == intake.describe() and jobs.accepted_json(job)["input"]["duration_s"] == 1.0
    # A run started otherwise (an S3 upload, the Prefect UI): its kind from its image, as the run decides it.
    other = jobs.RunView(**{**run.__dict__, "labels": {}})
    assert jobs.job_json(other, result=None, output_prefix=None, outputs={}, status_url="u", review_url=None,
                         attempts=[])["input"] == {"kind": "video"}
    photo = jobs.RunView(**{**run.__dict__, "labels": {}, "parameters": {"image": "s3://b/p.png"}})
    assert jobs.input_summary(photo) == {"kind": "photo"}


# ---- on the local stack (HTTP only) ----------------------------------------------------------------------------


@pytest.fixture
def api(stack):
    from .test_web_api import Api

    api = Api(stack)
    yield api
    api.client.close()


def stack_clip(seed: int) -> bytes:
    """A 1.5 s WebM (45 frames, 96x72) of the red disc crossing the frame: the lite tracker follows it."""
    return encode(moving_object(240, seed=seed).frames[:90:2], "webm")


@pytest.mark.slow
def test_a_clip_is_stored_once_and_runs_to_a_job_with_its_track_and_chosen_frame(api):
    clip = stack_clip(601)
    digest = hashlib.sha256(clip).hexdigest()
    first = api.submit(clip, "turn table.mp4", prompt=f"red disc {uuid.uuid4().hex[:6]}", video_frames="2")
    assert first.status_code == 202, first.text
    accepted = first.json()
    facts = accepted["input"]
    assert facts["kind"] == "video" and facts["container"] == "webm" and (facts["width"], facts["height"]) == (96, 72)
    assert facts["frames_read"] == 45 and facts["duration_s"] == pytest.approx(1.5, abs=0.05)
    assert accepted["output_prefix"].startswith(f"{api.stack.env['SAM3D_OUTPUT_ROOT']}/turn-table-")
    # The same clip again (another prompt): the same content-addressed object, stored once.
    again = api.submit(clip, "turn table.mp4", prompt="red disc")
    assert again.status_code == 202, again.text
    stored = api.stack.s3.list_objects_v2(Bucket=api.stack.bucket,
                                          Prefix=f"{api.stack.env['SAM3D_OUTPUT_PREFIX']}_uploads/{digest}/")
    assert [o["Key"].rsplit("/", 1)[-1] for o in stored.get("Contents", [])] == ["turn-table.webm"]
    head = api.stack.s3.head_object(Bucket=api.stack.bucket, Key=stored["Contents"][0]["Key"])
    assert head["ContentType"] == "video/webm" and head["ContentLength"] == len(clip)
    # The stored clip named by its URI is a video job too.
    uri = f"s3://{api.stack.bucket}/{stored['Contents'][0]['Key']}"
    by_uri = api.client.submit_uri(uri, "red disc", video_frames=3)  # the Python client, as a user would
    assert by_uri["input"]["frames_read"] == 45, by_uri

    job = api.client.wait(accepted["id"], timeout_s=240, poll_s=0.5)
    assert job["status"] == "completed", job
    assert job["input"] == facts
    assert {"frame.png", "track.webp", "mask.png", "object.glb", "result.json"} <= set(job["outputs"])
    assert {"frame.png", "track.webp"} <= set(job["backends"]["segmenter"]["produced"])
    video = job["result"]["video"]
    assert video["frames_read"] == 45 and video["frames_tracked"] > 0
    assert "frames" not in video  # the per-frame scores stay in result.json
    chosen = video["chosen"]
    assert chosen["time_s"] == pytest.approx(chosen["index"] / 30, abs=0.02) and 0 < chosen["view_score"] <= 1
    assert len(video["candidates"]) == 2  # video_frames=2 reached the flow
    track = requests.get(job["outputs"]["track.webp"], timeout=30)
    assert track.status_code == 200 and track.headers["Content-Type"] == "image/webp"
    assert Image.open(io.BytesIO(track.content)).is_animated
    frame = requests.get(job["outputs"]["frame.png"], timeout=30)
    assert frame.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(frame.content)).text["frame_index"] == str(chosen["index"])
    assert api.client.wait(again.json()["id"], timeout_s=240, poll_s=0.5)["status"] == "completed"
    named = api.client.wait(by_uri["id"], timeout_s=240, poll_s=0.5)
    assert named["status"] == "completed" and len(named["result"]["video"]["candidates"]) == 3


@pytest.mark.slow
def test_bad_clips_get_their_status_and_reason_and_create_nothing(api):
    prefix = api.stack.env["SAM3D_OUTPUT_PREFIX"]

    def stored_uploads() -> int:
        return api.stack.s3.list_objects_v2(Bucket=api.stack.bucket, Prefix=f"{prefix}_uploads/").get("KeyCount", 0)

    good = stack_clip(602)
    cut_key = f"{prefix}_test-clips/{uuid.uuid4().hex[:8]}/cut.webm"  # under the output root: no trigger acts on it
    api.stack.s3.put_object(Bucket=api.stack.bucket, Key=cut_key, Body=good[: len(good) // 2])
    runs, stored = api.run_count(), stored_uploads()
    cases = [
        (api.submit(good[: len(good) // 2], "cut.webm", prompt="disc"), 422, "cut.webm: truncated"),
        (api.submit(audio_only(), "sound.mp4", prompt="disc"), 422, "sound.mp4: audio only"),
        (api.submit(b"\0\0\0\x18ftypisom" + bytes(STACK_MAX_INPUT_BYTES), "huge.mp4", prompt="disc"), 413,
         f"exceeds SAM3D_MAX_INPUT_BYTES={STACK_MAX_INPUT_BYTES:,}"),
        (api.submit(good, "c.webm", prompt="disc", points='[{"x": 96, "y": 10, "label": 1}]'), 422,
         "lies outside the 96x72 image"),
        (requests.post(f"{api.base}/v1/jobs", headers=api.auth, timeout=60,
                       json={"prompt": "disc", "image": f"s3://{api.stack.bucket}/{cut_key}"}), 422, "cut.webm: "),
    ]
    for answer, status, reason in cases:
        assert answer.status_code == status, (status, reason, answer.status_code, answer.text)
        assert reason in answer.json()["detail"], (reason, answer.text)
    assert api.run_count() == runs
    assert stored_uploads() == stored
