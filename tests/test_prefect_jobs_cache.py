"""The job API reads a job's run with the deployment's id as last read, and reads it again when a run names
another: a deployment registered anew (a new id) still has its jobs found, and other deployments' runs are not jobs."""

import uuid

from prefect import flow

from sam3d_pipeline.prefect_client import sync_client
from sam3d_pipeline.web import prefect_jobs


@flow(name="job-cache-test")
def _job_flow() -> None:
    pass


def test_a_job_of_a_deployment_registered_anew_is_found(prefect_server, monkeypatch):
    name = f"jobs-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(prefect_jobs, "DEPLOYMENT", f"job-cache-test/{name}")
    with sync_client() as client:
        first = client.create_flow_run_from_deployment(_job_flow.to_deployment(name=name).apply())
        other = client.create_flow_run_from_deployment(_job_flow.to_deployment(name=f"{name}-other").apply())
        assert prefect_jobs.read(str(first.id)).id == str(first.id)  # the id is now known
        assert prefect_jobs.read(str(other.id)) is None  # another deployment's run is no job

        client.delete_deployment(first.deployment_id)
        again = client.create_flow_run_from_deployment(_job_flow.to_deployment(name=name).apply())
        assert again.deployment_id != first.deployment_id
    assert prefect_jobs.read(str(again.id)).id == str(again.id)  # found: the id is read again
    assert prefect_jobs.read(str(other.id)) is None
