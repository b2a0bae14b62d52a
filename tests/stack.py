"""The local stack the slow tests share: one ``sam3d-pipeline up`` per test session (the ``stack`` fixture in
``conftest.py``), and :class:`Stack`, the handle the tests use to upload, list runs and read results.

The stack's notification covers the whole bucket (no upload prefix), so the pipeline's own outputs, markers and
job-API uploads reach the events bridge too and must be ignored there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sam3d_pipeline.stack.local import read_stack

from .photos import encode, object_photo

CLI = [sys.executable, "-m", "sam3d_pipeline.cli"]
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
# Set for the whole stack: a small upload limit lets the job API's 413 be tested with a small file.
STACK_MAX_INPUT_BYTES = 4 * 1024 * 1024


class Stack:
    """A running local stack, read from its ``local-stack.env``."""

    def __init__(self, state_dir: Path) -> None:
        import boto3

        self.state_dir = state_dir
        self.env = {}
        for line in (state_dir / "local-stack.env").read_text().splitlines():
            if "=" in line and not line.startswith("#"):
                name, value = line.split("=", 1)
                self.env[name] = value.strip("'")
        kwargs = {"endpoint_url": self.env["AWS_ENDPOINT_URL"], "region_name": "us-east-1",
                  "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        self.s3 = boto3.client("s3", **kwargs)
        self.sqs = boto3.client("sqs", **kwargs)
        self.bucket = self.env["SAM3D_BUCKET"]
        self.api = self.env["PREFECT_API_URL"]
        self.bridge_log = state_dir / "logs" / "events-bridge.log"
        self.web = self.env["SAM3D_WEB_URL"]  # studio, job API and review page: one server
        self.token = self.env["SAM3D_API_TOKEN"]
        self.replacement_bridges: list[subprocess.Popen] = []

    def put(self, key: str, seed: int, prompt: str | None = None) -> str:
        rgb, _ = object_photo(160, 120, seed=seed)
        return self.put_bytes(key, encode(rgb), prompt)

    def put_bytes(self, key: str, body: bytes, prompt: str | None = None) -> str:
        metadata = {"prompt": prompt} if prompt else {}
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=metadata)
        return f"s3://{self.bucket}/{key}"

    def runs(self, image: str) -> list[dict]:
        import urllib.request

        body = json.dumps({"limit": 200, "sort": "EXPECTED_START_TIME_ASC"}).encode()
        request = urllib.request.Request(f"{self.api}/flow_runs/filter", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return [r for r in json.loads(response.read()) if r["parameters"].get("image") == image]

    def wait_finished(self, images: list[str], timeout_s: float = 240) -> dict[str, list[dict]]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = {image: self.runs(image) for image in images}
            if all(runs and all(r["state_type"] in FINAL for r in runs) for runs in found.values()):
                return found
            if time.monotonic() > deadline:
                states = {i: [r["state_type"] for r in runs] for i, runs in found.items()}
                pytest.fail(f"runs not finished after {timeout_s} s: {states}\n{self.log_tail()}")
            time.sleep(0.5)

    def wait_log(self, text: str, count: int = 1, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.bridge_log.read_text().count(text) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"bridge never logged {text!r} x{count}\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        return "\n".join(self.bridge_log.read_text().splitlines()[-20:])

    def result(self, run: dict) -> tuple[str, dict]:
        """(output prefix, result.json) of a completed run, found by its flow run id."""
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=self.env["SAM3D_OUTPUT_PREFIX"])
        for item in listing.get("Contents", []):
            if item["Key"].endswith("/result.json"):
                result = json.loads(self.s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read())
                if result.get("flow_run_id") == run["id"]:
                    return item["Key"].rsplit("/", 1)[0] + "/", result
        pytest.fail(f"no result.json for run {run['id']}")

    def bridge_pid(self) -> int:
        if self.replacement_bridges:
            return self.replacement_bridges[-1].pid
        return read_stack(self.state_dir)["processes"]["events-bridge"]["pid"]

    def restart_bridge(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))} | self.env
        env["SAM3D_BRIDGE_WAIT_S"] = "10"
        with open(self.bridge_log, "ab") as log:
            proc = subprocess.Popen([*CLI, "events-bridge", "--queue-url", self.env["SAM3D_QUEUE_URL"]], env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.replacement_bridges.append(proc)
