"""Fast tests of the sam3 backend's support code: box conversion, embeddings format, vocabulary, checkpoints,
backend choice and the doctor. No model is built here."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sam3d_pipeline import backends
from sam3d_pipeline.backends.sam3 import embeddings
from sam3d_pipeline.cli.doctor import (
    FAIL,
    OK,
    WARN,
    check_checkpoint,
    check_prefect,
    exit_code,
    expected_work_pools,
)
from sam3d_pipeline.errors import BackendUnavailableError, InputError
from sam3d_pipeline.settings import Settings

from .servers import free_port


def test_xyxy_box_becomes_normalised_cxcywh():
    pytest.importorskip("torch")
    from sam3d_pipeline.backends.sam3.segmenter import xyxy_to_cxcywh_norm

    assert xyxy_to_cxcywh_norm((100, 20, 300, 120), 400, 200) == pytest.approx([0.5, 0.35, 0.5, 0.5])
    # Clipped to the image first: the part outside does not count.
    assert xyxy_to_cxcywh_norm((-100, 0, 200, 100), 400, 200) == pytest.approx([0.25, 0.25, 0.5, 0.5])
    with pytest.raises(InputError, match="no area inside the 400x200 image"):
        xyxy_to_cxcywh_norm((500, 10, 600, 20), 400, 200)


def _features(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image_embed": rng.standard_normal((1, 256, 72, 72)).astype(np.float32),
        "high_res_feats_0": (rng.standard_normal((1, 32, 288, 288)) * 0.1).astype(np.float32),
        "high_res_feats_1": (rng.standard_normal((1, 64, 144, 144)) * 0.3).astype(np.float32),
    }


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_embeddings_round_trip_within_half_a_step(bits):
    feats = _features()
    feats["image_embed"][0, 3] = 7.0  # a constant channel must survive too
    blob = embeddings.encode(feats, bits)
    back = embeddings.decode(blob)
    assert set(back) == set(feats)
    for name, array in feats.items():
        assert back[name].shape == array.shape and back[name].dtype == np.float32
        channels = np.moveaxis(array, 1, 0).reshape(array.shape[1], -1)
        step = (channels.max(1) - channels.min(1)) / ((1 << bits) - 1)
        err = np.abs(np.moveaxis(back[name] - array, 1, 0).reshape(array.shape[1], -1)).max(1)
        assert (err <= step / 2 + 1e-6).all(), name
    assert np.allclose(back["image_embed"][0, 3], 7.0)


def test_default_embeddings_fit_in_4_mb():
    feats = _features()
    float_bytes = sum(a.nbytes for a in feats.values())
    blob = embeddings.encode(feats)
    assert float_bytes == 21_233_664
    assert len(blob) <= 4_000_000


def test_embeddings_reject_bad_input():
    with pytest.raises(ValueError, match="bad magic"):
        embeddings.decode(b"nope" + bytes(20))
    with pytest.raises(ValueError, match="non-finite"):
        embeddings.encode({"x": np.full((1, 2, 3, 3), np.nan, np.float32)})
    blob = embeddings.encode({"x": np.ones((1, 2, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="truncated"):
        embeddings.decode(blob[:-2])


def test_vocab_is_found_and_md5_checked():
    pytest.importorskip("open_clip")
    from sam3d_pipeline.backends.sam3.assets import VOCAB_MD5, file_md5, find_bpe_vocab

    path = find_bpe_vocab()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz"
    assert file_md5(path) == VOCAB_MD5


def test_missing_vocab_names_what_to_install(monkeypatch):
    from sam3d_pipeline.backends.sam3 import assets as sam3_assets

    monkeypatch.setattr(sam3_assets, "_package_dir", lambda name: None)
    with pytest.raises(BackendUnavailableError, match="install open_clip_torch"):
        sam3_assets.find_bpe_vocab()


def test_local_checkpoint_missing_file_is_named(tmp_path):
    from sam3d_pipeline.backends.sam3.assets import resolve_checkpoint

    missing = tmp_path / "nope.pt"
    with pytest.raises(InputError, match=f"checkpoint {missing}: no such file"):
        resolve_checkpoint(Settings(sam3_checkpoint=str(missing)))
    present = tmp_path / "sam3.pt"
    present.write_bytes(b"x" * 10)
    ref = resolve_checkpoint(Settings(sam3_checkpoint=str(present)))
    assert ref.path == present and ref.size_bytes == 10
    assert resolve_checkpoint(Settings()) is None


def test_hub_checkpoint_refused_unless_allowed(tmp_path):
    from sam3d_pipeline.backends.sam3.assets import resolve_checkpoint

    with pytest.raises(BackendUnavailableError, match="SAM3D_SAM3_ALLOW_HUB=true"):
        resolve_checkpoint(Settings(sam3_checkpoint="hf://facebook/sam3", model_cache_dir=str(tmp_path)))
    assert not any(tmp_path.iterdir())  # nothing downloaded


@pytest.mark.slow
def test_s3_checkpoint_downloaded_once_and_sha256_checked(s3, tmp_path):
    from sam3d_pipeline.backends.sam3.assets import resolve_checkpoint

    client, bucket = s3
    data = b"not really a checkpoint" * 1000
    client.put_object(Bucket=bucket, Key="models/sam3.pt", Body=data)
    uri = f"s3://{bucket}/models/sam3.pt"
    cache = tmp_path / "cache"

    wrong = Settings(sam3_checkpoint=uri, sam3_checkpoint_sha256="0" * 64, model_cache_dir=str(cache))
    with pytest.raises(BackendUnavailableError, match="does not match the configured"):
        resolve_checkpoint(wrong)
    assert not [p for p in cache.rglob("*") if p.is_file()]  # refused file is not left behind

    right = Settings(sam3_checkpoint=uri, sam3_checkpoint_sha256=hashlib.sha256(data).hexdigest(),
                     model_cache_dir=str(cache))
    ref = resolve_checkpoint(right)
    assert ref.path.read_bytes() == data and ref.path.is_relative_to(cache)
    mtime = ref.path.stat().st_mtime_ns
    assert resolve_checkpoint(right).path.stat().st_mtime_ns == mtime  # cached, not fetched again

    with pytest.raises(Exception, match="s3://"):
        resolve_checkpoint(Settings(sam3_checkpoint=f"s3://{bucket}/missing.pt", model_cache_dir=str(cache)))


def test_auto_falls_back_to_lite_without_a_checkpoint():
    chosen = backends.resolve("segmenter", "auto", Settings())
    assert chosen.name == "lite"
    assert "sam3 unavailable" in chosen.reason and "SAM3D_SAM3_CHECKPOINT" in chosen.reason
    with pytest.raises(BackendUnavailableError, match="no checkpoint configured"):
        backends.resolve("segmenter", "sam3", Settings())


@pytest.mark.slow
def test_auto_chooses_sam3_when_it_imports_and_is_configured():
    pytest.importorskip("sam3")
    chosen = backends.resolve("segmenter", "auto", Settings(sam3_random_init=True))
    assert chosen.name == "sam3" and chosen.reason == "auto chose sam3"


def test_library_imports_without_torch():
    code = ("import sys; import sam3d_pipeline.cli.main, sam3d_pipeline.cli.doctor, "
            "sam3d_pipeline.backends.sam3.embeddings, sam3d_pipeline.backends.sam3.assets; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_doctor_checkpoint_lines(tmp_path):
    def no_s3(bucket, key):
        raise AssertionError("S3 must not be called for local checkpoints")

    missing = check_checkpoint(Settings(sam3_checkpoint=str(tmp_path / "x.pt")), no_s3)
    assert missing.status == FAIL and "no such file" in missing.line()
    assert "fix: fix SAM3D_SAM3_CHECKPOINT" in missing.line()
    small = tmp_path / "small.pt"
    small.write_bytes(b"123")
    assert check_checkpoint(Settings(sam3_checkpoint=str(small)), no_s3).status == WARN
    hub = check_checkpoint(Settings(sam3_checkpoint="hf://facebook/sam3"), no_s3)
    assert hub.status == FAIL and "SAM3D_SAM3_ALLOW_HUB" in hub.fix
    none = check_checkpoint(Settings(), no_s3)
    assert none.status == WARN and "auto uses lite" in none.detail


def test_doctor_reports_unreachable_prefect_api():
    checks = check_prefect(f"http://127.0.0.1:{free_port()}/api", ["sam3d-cpu"])
    assert [c.status for c in checks] == [FAIL, FAIL]
    assert "prefect server start" in checks[0].line()
    assert exit_code(checks, strict=False) == 1
    local = check_prefect(None, ["sam3d-cpu"])
    assert [c.status for c in local] == [OK, WARN]
    assert exit_code(local, strict=False) == 0 and exit_code(local, strict=True) == 1


def test_doctor_reads_work_pools_from_prefect_yaml(tmp_path, monkeypatch):
    yaml_file = tmp_path / "prefect.yaml"
    yaml_file.write_text("deployments:\n- name: a\n  work_pool:\n    name: \"{{ $POOL_A | default('cpu-a') }}\"\n"
                         "- name: b\n  work_pool:\n    name: gpu-b\n")
    monkeypatch.delenv("POOL_A", raising=False)
    assert expected_work_pools(yaml_file) == ["cpu-a", "gpu-b"]
    monkeypatch.setenv("POOL_A", "mine")
    assert expected_work_pools(yaml_file) == ["mine", "gpu-b"]
    assert expected_work_pools(Path(tmp_path / "absent.yaml")) == ["sam3d-cpu"]


@pytest.mark.slow
def test_doctor_checks_work_pools_on_a_real_server(prefect_server):
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    pool = f"sam3d-test-{uuid.uuid4().hex[:8]}"
    api, pools = check_prefect(url, [pool])
    assert api.status == OK and pools.status == FAIL
    assert f"missing: {pool}" in pools.detail and f"prefect work-pool create {pool}" in pools.fix
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    api, pools = check_prefect(url, [pool])
    assert pools.status == OK and pool in pools.detail


@pytest.mark.slow
def test_doctor_command_fails_with_a_clear_line(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "SAM3D_"))}
    env["SAM3D_SAM3_CHECKPOINT"] = str(tmp_path / "gone.pt")
    proc = subprocess.run([sys.executable, "-m", "sam3d_pipeline.cli", "doctor"], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[1], env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("fail checkpoint:") and "gone.pt: no such file" in line for line in lines), proc.stdout
    assert any(line.startswith("ok   python:") for line in lines)
    assert any(line.startswith("ok   prefect-api:") for line in lines), proc.stdout
    assert lines[-1] == "doctor: FAILED"


def test_weights_are_part_of_the_output_key():
    pytest.importorskip("torch")
    from sam3d_pipeline.backends.sam3.segmenter import Sam3Segmenter

    random = Sam3Segmenter(Settings(sam3_random_init=True)).info()
    real = Sam3Segmenter(Settings(sam3_checkpoint="/models/sam3.pt")).info()
    pinned = Sam3Segmenter(Settings(sam3_checkpoint="/models/sam3.pt", sam3_checkpoint_sha256="AB" * 32)).info()
    assert random.weights == "random-init" and real.weights == "checkpoint"
    assert len({random.key(), real.key(), pinned.key()}) == 3
    assert pinned.version == "sam3-0.1.4+abababababab"


@pytest.mark.slow
@pytest.mark.parametrize("status", [401, 403])
def test_gated_hub_answer_explains_access(tmp_path, status):
    """A local HTTP endpoint answering like the gated hub (HF_ENDPOINT), reached by the real huggingface_hub."""
    import http.server
    import os
    import threading

    class Gated(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            self.send_response(status)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model facebook/sam3 is restricted.")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gated)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SAM3D_"))}
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HOME=str(tmp_path / "hf"),
                   SAM3D_SAM3_CHECKPOINT="hf://facebook/sam3", SAM3D_SAM3_ALLOW_HUB="true",
                   SAM3D_MODEL_CACHE_DIR=str(tmp_path / "cache"))
        code = ("from sam3d_pipeline.backends.sam3.assets import resolve_checkpoint;"
                "from sam3d_pipeline.settings import Settings\n"
                "try:\n    resolve_checkpoint(Settings())\n"
                "except Exception as exc:\n    print(type(exc).__name__, exc)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.stdout.startswith("BackendUnavailableError"), proc.stdout + proc.stderr
    assert f"answered {status}" in proc.stdout and "hf auth login" in proc.stdout and "gated" in proc.stdout


def test_doctor_names_a_bad_setting():
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3D_")}
    env["SAM3D_SAM3_CONFIDENCE_THRESHOLD"] = "1.5"
    proc = subprocess.run([sys.executable, "-m", "sam3d_pipeline.cli", "doctor"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[0].startswith("fail settings: SAM3D_SAM3_CONFIDENCE_THRESHOLD='1.5'"), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
