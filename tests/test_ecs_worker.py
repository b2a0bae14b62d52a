"""prefect-aws's ECS worker, in-process, against moto's ECS, EC2, IAM and CloudWatch Logs with our job templates."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from . import gpu_image

ROOT = Path(__file__).parents[1]
DEPLOYMENTS = ROOT / "deployments"
pytestmark = pytest.mark.slow


def _template(name: str) -> dict:
    return json.loads((DEPLOYMENTS / name).read_text())


@pytest.mark.parametrize("name", ["ecs-gpu-job-template.json", "ecs-cpu-job-template.json"])
def test_templates_validate_against_the_ecs_worker_schema(name):
    """The template's variables form a valid JSON schema whose defaults validate, and every placeholder in the
    job configuration names a declared variable (what the Prefect API checks when the pool is created)."""
    import jsonschema
    from prefect.utilities.templating import find_placeholders
    from prefect_aws.workers.ecs_worker import ECSJobConfiguration, ECSWorker

    template = _template(name)
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)
    declared = set(variables["properties"])
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= declared, used - declared
    # Same job configuration fields as the worker's own template (no typos, none missing).
    assert set(template["job_configuration"]) == set(ECSWorker.get_default_base_job_template()["job_configuration"])
    assert set(template["job_configuration"]) <= set(ECSJobConfiguration.model_fields)


def test_gpu_template_shape():
    template = _template("ecs-gpu-job-template.json")
    jc = template["job_configuration"]
    [container] = jc["task_definition"]["containerDefinitions"]
    assert container["resourceRequirements"] == [{"type": "GPU", "value": "{{ gpu_count }}"}]
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    assert "launchType" not in jc["task_run_request"] and "launch_type" not in template["variables"]["properties"]
    assert jc["task_run_request"]["capacityProviderStrategy"] == "{{ capacity_provider_strategy }}"
    assert jc["task_definition"]["requiresCompatibilities"] == ["EC2"]
    assert template["variables"]["properties"]["gpu_count"]["type"] == "string"
    assert template["variables"]["properties"]["memory"]["default"] >= 24 * 1024
    # A session asked to stop (drain, spot notice) gets ECS's longest grace to finish its task; an init process
    # forwards the SIGTERM and reaps what the models' libraries spawn.
    assert container["stopTimeout"] == 120
    assert container["linuxParameters"]["initProcessEnabled"] is True
    env = template["variables"]["properties"]["env"]["default"]
    assert env["SAM3D_GPU_STAGES"] == "workers" and float(env["SAM3D_GPU_IDLE_S"]) > 0
    assert env["PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK"] == env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]


@pytest.fixture
def aws(moto_server, monkeypatch):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    return lambda service: boto3.client(service, endpoint_url=moto_server.url, region_name="us-east-1")


@pytest.fixture
def gpu_cluster(aws):
    """A cluster with a g5 capacity provider and one registered container instance (moto)."""
    suffix = uuid.uuid4().hex[:8]
    ecs, ec2, iam, logs = aws("ecs"), aws("ec2"), aws("iam"), aws("logs")
    cluster = f"sam3d-{suffix}"
    provider = f"sam3d-g5-{suffix}"
    ecs.create_cluster(clusterName=cluster)
    asg = aws("autoscaling")
    asg.create_launch_configuration(LaunchConfigurationName=f"lc-{suffix}", ImageId="ami-12c6146b",
                                    InstanceType="g5.2xlarge")
    asg.create_auto_scaling_group(AutoScalingGroupName=f"asg-{suffix}", LaunchConfigurationName=f"lc-{suffix}",
                                  MinSize=0, MaxSize=5, AvailabilityZones=["us-east-1a"])
    asg_arn = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[f"asg-{suffix}"])[
        "AutoScalingGroups"][0]["AutoScalingGroupARN"]
    ecs.create_capacity_provider(name=provider, autoScalingGroupProvider={
        "autoScalingGroupArn": asg_arn, "managedScaling": {"status": "ENABLED", "targetCapacity": 100},
        "managedTerminationProtection": "DISABLED"})
    ecs.put_cluster_capacity_providers(cluster=cluster, capacityProviders=[provider],
                                       defaultCapacityProviderStrategy=[{"capacityProvider": provider, "weight": 1}])
    [instance] = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="g5.2xlarge")[
        "Instances"]
    ecs.register_container_instance(cluster=cluster, instanceIdentityDocument=json.dumps(
        {"instanceId": instance["InstanceId"], "region": "us-east-1"}))
    trust = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                                "Principal": {"Service": "ecs-tasks.amazonaws.com"}}]})
    task_role = iam.create_role(RoleName=f"gpu-task-{suffix}", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
    exec_role = iam.create_role(RoleName=f"gpu-exec-{suffix}", AssumeRolePolicyDocument=trust)["Role"]["Arn"]
    logs.create_log_group(logGroupName=f"/sam3d/gpu-{suffix}")
    return {"cluster": cluster, "provider": provider, "task_role": task_role, "exec_role": exec_role,
            "log_group": f"/sam3d/gpu-{suffix}", "ecs": ecs}


def _run_worker(monkeypatch, template_name: str, values: dict):
    """Run prefect-aws's ECSWorker in-process for one flow run; returns (flow_run, result, run_task requests)."""
    import anyio
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect_aws.workers import ecs_worker
    from prefect_aws.workers.ecs_worker import ECSJobConfiguration, ECSWorker

    # The worker's event observer polls SQS with aiobotocore, which does not work against in-process moto;
    # it only reports state changes after the task starts, which these tests do not need.
    async def _no_observer():
        return None

    monkeypatch.setattr(ecs_worker, "start_observer", _no_observer)
    monkeypatch.setattr(ecs_worker, "stop_observer", _no_observer)
    run_requests = []
    original = ECSWorker._create_task_run

    def recording_create_task_run(self, ecs_client, task_run_request):
        run_requests.append(json.loads(json.dumps(task_run_request, default=str)))
        return original(self, ecs_client, task_run_request)

    monkeypatch.setattr(ECSWorker, "_create_task_run", recording_create_task_run)

    @flow(name="gpu-worker")
    def session():  # only its flow run record is used
        return None

    async def go():
        async with get_client() as client:
            flow_run = await client.create_flow_run(session, parameters={})
        config = await ECSJobConfiguration.from_template_and_values(_template(template_name), values)
        config.prepare_for_flow_run(flow_run)
        async with ECSWorker(work_pool_name=f"sam3d-{uuid.uuid4().hex[:6]}", create_pool_if_not_found=False) as w:
            return flow_run, await w.run(flow_run, config)

    flow_run, result = anyio.run(go)
    return flow_run, result, run_requests


@pytest.mark.parametrize("deployment, stages", [("gpu-worker-sam3", "segment"), ("gpu-worker-sam3d", "reconstruct")])
def test_ecs_worker_starts_a_gpu_worker_session_on_the_capacity_provider(prefect_server, gpu_cluster, monkeypatch,
                                                                       deployment, stages):
    c = gpu_cluster
    image = f"123456789012.dkr.ecr.us-east-1.amazonaws.com/sam3d-gpu-{deployment.rsplit('-', 1)[1]}:0.1.0"
    # The session deployment's job variables, with the image and the cluster's names of this test. moto's
    # container instances offer 4096 CPU units / 7482 MiB and no GPU model, so the task is sized to fit them here;
    # the template's g5 defaults are checked in test_gpu_template_shape.
    # `prefect deploy` fills the deployment's {{ $VAR }} placeholders (the declared weights) from its shell.
    declared = {"SAM3D_SAM3_CHECKPOINT_SHA256": "a" * 64, "SAM3D_SAM3D_CHECKPOINT_SHA256": "b" * 64}
    deployment_env = gpu_image.deployment_env(deployment, declared)
    values = {"cluster": c["cluster"], "image": image, "cpu": 2048, "memory": 4096, "task_role_arn": c["task_role"],
              "execution_role_arn": c["exec_role"], "log_group": c["log_group"], "env": deployment_env,
              "capacity_provider_strategy": [{"capacityProvider": c["provider"], "weight": 1, "base": 0}]}
    flow_run, result, run_requests = _run_worker(monkeypatch, "ecs-gpu-job-template.json", values)
    assert result.status_code == 0 and c["cluster"] in result.identifier

    [request] = run_requests
    assert "launchType" not in request
    assert request["capacityProviderStrategy"] == [{"capacityProvider": c["provider"], "weight": 1, "base": 0}]
    assert request["cluster"] == c["cluster"]
    [override] = request["overrides"]["containerOverrides"]
    assert override["command"] == ["prefect", "flow-run", "execute"] or "prefect flow-run execute" in " ".join(
        override["command"])
    env = {e["name"]: e["value"] for e in override["environment"]}
    assert env["PREFECT__FLOW_RUN_ID"] == str(flow_run.id)
    # The deployment's env is merged over the pool's: the session gets its stage mode and models from the
    # deployment, its idle timeout and the shared task storage from the pool.
    pool_env = _template("ecs-gpu-job-template.json")["variables"]["properties"]["env"]["default"]
    assert {k: env[k] for k in pool_env} == {**pool_env, **{k: v for k, v in deployment_env.items() if k in pool_env}}
    assert {k: env[k] for k in deployment_env} == deployment_env
    assert env["SAM3D_GPU_STAGES"] == "workers" and env["SAM3D_GPU_WORKER_STAGES"] == stages
    assert {k: v for k, v in env.items() if k.endswith("_CHECKPOINT_SHA256")}.items() <= declared.items()
    assert any(k.endswith("_CHECKPOINT_SHA256") for k in env)
    assert env["PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK"].startswith("s3-bucket/")
    assert request["overrides"]["taskRoleArn"] == c["task_role"]

    ecs = c["ecs"]
    task_def = ecs.describe_task_definition(taskDefinition=request["taskDefinition"])["taskDefinition"]
    [container] = task_def["containerDefinitions"]
    assert container["image"] == image
    assert container["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert container["memory"] == 4096 and container["cpu"] == 2048
    assert container["logConfiguration"]["options"]["awslogs-group"] == c["log_group"]
    assert container["stopTimeout"] == 120
    assert task_def["requiresCompatibilities"] == ["EC2"]
    assert task_def["executionRoleArn"] == c["exec_role"] and task_def["taskRoleArn"] == c["task_role"]
    [task] = ecs.describe_tasks(cluster=c["cluster"], tasks=[result.identifier.split("::", 1)[1]])["tasks"]
    assert task["taskDefinitionArn"] == task_def["taskDefinitionArn"]
    assert task.get("launchType") != "FARGATE"

