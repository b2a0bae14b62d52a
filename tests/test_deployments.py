"""Cloud configuration: the CloudFormation template (cfn-lint, least-privilege IAM) and prefect.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
INFRA = ROOT / "deployments" / "infrastructure.yaml"
UPLOADS = "arn:${AWS::Partition}:s3:::${BucketName}/${UploadPrefix}*"
OUTPUTS = "arn:${AWS::Partition}:s3:::${BucketName}/${OutputPrefix}*"
BUCKET = "arn:${AWS::Partition}:s3:::${BucketName}"
READ = {"s3:GetObject", "s3:GetObjectVersion"}
WRITE = {"s3:PutObject", "s3:DeleteObject"}


@pytest.fixture(scope="module")
def template():
    from cfnlint.decode import decode

    data, matches = decode(str(INFRA))
    assert not matches, matches
    return data


def test_cfn_lint_finds_nothing():
    from cfnlint.api import lint_file

    matches = lint_file(INFRA)
    assert not matches, "\n".join(str(m) for m in matches)


def _statements(template):
    """Every IAM statement in the template: (resource name, statement)."""
    for name, res in template["Resources"].items():
        props = res.get("Properties", {})
        docs = []
        if res["Type"] == "AWS::IAM::ManagedPolicy":
            docs.append(props["PolicyDocument"])
        if res["Type"] == "AWS::IAM::Role":
            docs += [p["PolicyDocument"] for p in props.get("Policies", [])]
        for doc in docs:
            for statement in doc["Statement"]:
                yield name, statement


def _list(value):
    return value if isinstance(value, list) else [value]


def _resource(value):
    return value["Fn::Sub"] if isinstance(value, dict) and "Fn::Sub" in value else value


def test_s3_access_is_limited_to_the_two_prefixes(template):
    s3_statements = 0
    for name, st in _statements(template):
        actions = set(_list(st["Action"]))
        assert not any(a in ("*", "s3:*") or a.endswith(":*") for a in actions), (name, actions)
        assert st["Effect"] == "Allow"
        s3_actions = {a for a in actions if a.startswith("s3:")}
        if not s3_actions:
            continue
        s3_statements += 1
        assert s3_actions == actions, f"{name}: S3 mixed with other services in one statement"
        resources = {_resource(r) for r in _list(st["Resource"])}
        if s3_actions == {"s3:ListBucket"}:
            assert resources == {BUCKET}
            prefixes = {_resource(p) for p in st["Condition"]["StringLike"]["s3:prefix"]}
            assert prefixes == {"${UploadPrefix}*", "${OutputPrefix}*"}
        elif resources == {UPLOADS}:
            assert s3_actions <= READ, f"{name}: uploads are read-only, got {s3_actions}"
        elif resources == {OUTPUTS}:
            assert s3_actions <= READ | WRITE
        else:
            pytest.fail(f"{name}: S3 access outside the two prefixes: {resources}")
    assert s3_statements == 3
    # Both task roles that touch data use exactly that policy; the worker role has no S3 access at all.
    for role in ("GpuStageTaskRole", "CpuFlowTaskRole"):
        props = template["Resources"][role]["Properties"]
        assert props["ManagedPolicyArns"] == [{"Ref": "PipelineDataPolicy"}] and "Policies" not in props
    worker_actions = {a for n, st in _statements(template) if n == "WorkerTaskRole" for a in _list(st["Action"])}
    assert not any(a.startswith("s3:") for a in worker_actions)
    pass_role = [st for n, st in _statements(template) if "iam:PassRole" in _list(st["Action"])]
    assert all(r != "*" for st in pass_role for r in _list(st["Resource"]))


def test_gpu_capacity_scales_to_zero_on_the_ecs_gpu_ami(template):
    res = template["Resources"]
    asg = res["GpuAutoScalingGroup"]["Properties"]
    assert asg["MinSize"] == "0" and asg["MaxSize"] == {"Ref": "GpuMaxInstances"}
    assert template["Parameters"]["GpuMaxInstances"]["Default"] == 5
    assert template["Parameters"]["GpuInstanceType"]["Default"] == "g5.2xlarge"
    assert "/gpu/" in template["Parameters"]["EcsGpuAmiId"]["Default"]
    provider = res["GpuCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert provider["ManagedScaling"]["Status"] == "ENABLED" and provider["ManagedScaling"]["TargetCapacity"] == 100
    user_data = res["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    assert "ECS_ENABLE_GPU_SUPPORT=true" in user_data and "ECS_CLUSTER=${Cluster}" in user_data
    assert {"Ref": "GpuCapacityProvider"} in res["ClusterCapacityProviders"]["Properties"]["CapacityProviders"]


def test_uploads_reach_the_queue_and_failures_the_dead_letter_queue(template):
    res = template["Resources"]
    assert res["PhotoBucket"]["Properties"]["NotificationConfiguration"]["EventBridgeConfiguration"][
        "EventBridgeEnabled"] is True
    rule = res["UploadRule"]["Properties"]
    assert rule["EventPattern"]["detail"]["object"]["key"] == [{"prefix": {"Ref": "UploadPrefix"}}]
    [target] = rule["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": ["UploadQueue", "Arn"]}
    assert target["DeadLetterConfig"]["Arn"] == {"Fn::GetAtt": ["UploadDeadLetterQueue", "Arn"]}
    redrive = res["UploadQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["UploadDeadLetterQueue", "Arn"]}


def test_prefect_yaml_maps_each_flow_to_its_pool():
    from prefect.flows import load_flow_from_entrypoint

    from sam3d_pipeline.settings import Settings

    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) >= {"image-to-3d", "segment-image", "reconstruct-objects"}
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    assert "sam3d-cpu" in pools["image-to-3d"]
    assert "sam3d-gpu" in pools["segment-image"] and "sam3d-gpu" in pools["reconstruct-objects"]
    # The cloud CPU pool sends the model stages to the GPU deployments; a local process pool runs them inline.
    cpu_template = json.loads((ROOT / "deployments" / "ecs-cpu-job-template.json").read_text())
    assert cpu_template["variables"]["properties"]["env"]["default"]["SAM3D_GPU_STAGES"] == "deployment"
    assert "SAM3D_GPU_STAGES" not in json.dumps(deployments["image-to-3d"])
    settings = Settings()
    full_names = set()
    for name, d in deployments.items():
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        full_names.add(f"{flow.name}/{name}")
    assert {settings.segment_deployment, settings.reconstruct_deployment} <= full_names
