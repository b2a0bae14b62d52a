"""Cloud configuration: the CloudFormation template (cfn-lint, least-privilege IAM, warm pool, CPU worker) and
prefect.yaml (which flow runs on which pool, the gpu-worker session deployment)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
INFRA = ROOT / "deployments" / "infrastructure.yaml"
UPLOADS = "arn:${AWS::Partition}:s3:::${BucketName}/${UploadPrefix}*"
OUTPUTS = "arn:${AWS::Partition}:s3:::${BucketName}/${OutputPrefix}*"
TASKS = "arn:${AWS::Partition}:s3:::${BucketName}/${TaskStoragePrefix}*"
CATALOG = "arn:${AWS::Partition}:s3:::${BucketName}/${CatalogPrefix}*"
MARKERS = "arn:${AWS::Partition}:s3:::${BucketName}/${EventMarkerPrefix}*"
CHECKPOINTS = "arn:${AWS::Partition}:s3:::${CheckpointBucket}/${CheckpointPrefix}*"
BUCKET = "arn:${AWS::Partition}:s3:::${BucketName}"
CHECKPOINT_BUCKET = "arn:${AWS::Partition}:s3:::${CheckpointBucket}"
READ = {"s3:GetObject", "s3:GetObjectVersion"}
WRITE = {"s3:PutObject", "s3:DeleteObject"}
GPU_TEMPLATE = ROOT / "deployments" / "ecs-gpu-job-template.json"
CPU_TEMPLATE = ROOT / "deployments" / "ecs-cpu-job-template.json"
STORAGE_SETTINGS = ("PREFECT_TASKS_SCHEDULING_DEFAULT_STORAGE_BLOCK", "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK")


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


def test_s3_access_is_limited_to_the_pipeline_prefixes(template):
    """Each S3 statement names one of the pipeline's prefixes with the actions that prefix allows; the task roles
    that touch data share one policy; markers are the bridge's, checkpoints the GPU sessions'."""
    allowed = {UPLOADS: READ, CATALOG: READ, OUTPUTS: READ | WRITE, TASKS: READ | WRITE,
               MARKERS: {"s3:GetObject", "s3:PutObject"}, CHECKPOINTS: {"s3:GetObject"}}
    listable = {BUCKET: {"${UploadPrefix}*", "${CatalogPrefix}*", "${OutputPrefix}*", "${TaskStoragePrefix}*",
                         "${EventMarkerPrefix}*"},
                CHECKPOINT_BUCKET: {"${CheckpointPrefix}*"}}
    users: dict[str, set[str]] = {}
    for name, st in _statements(template):
        actions = set(_list(st["Action"]))
        assert not any(a in ("*", "s3:*") or a.endswith(":*") for a in actions), (name, actions)
        assert st["Effect"] == "Allow"
        s3_actions = {a for a in actions if a.startswith("s3:")}
        if not s3_actions:
            continue
        assert s3_actions == actions, f"{name}: S3 mixed with other services in one statement"
        resources = {_resource(r) for r in _list(st["Resource"])}
        if s3_actions == {"s3:ListBucket"}:
            [bucket] = resources
            prefixes = {_resource(p) for p in _list(st["Condition"]["StringLike"]["s3:prefix"])}
            assert prefixes <= listable[bucket], (name, prefixes)
            continue
        for resource in resources:
            assert resource in allowed, f"{name}: S3 access outside the pipeline prefixes: {resource}"
            assert s3_actions <= allowed[resource], f"{name}: {s3_actions} on {resource}"
            users.setdefault(resource, set()).add(name)
    assert users[MARKERS] == {"EventsBridgeDataPolicy"}
    assert users[CHECKPOINTS] == {"GpuStageTaskRole"}
    assert users[TASKS] == {"PipelineDataPolicy"}
    assert users[OUTPUTS] == {"PipelineDataPolicy", "WebTaskRole"}
    # Both task roles that run pipeline work use exactly that policy (the GPU one adds the checkpoints).
    res = template["Resources"]
    for role in ("GpuStageTaskRole", "CpuFlowTaskRole"):
        assert res[role]["Properties"]["ManagedPolicyArns"] == [{"Ref": "PipelineDataPolicy"}]
    assert "Policies" not in res["CpuFlowTaskRole"]["Properties"]
    worker_actions = {a for n, st in _statements(template) if n == "WorkerTaskRole" for a in _list(st["Action"])}
    assert not any(a.startswith("s3:") for a in worker_actions)
    pass_role = [st for n, st in _statements(template) if "iam:PassRole" in _list(st["Action"])]
    assert all(r != "*" for st in pass_role for r in _list(st["Resource"]))
    # The prefixes are all different (uploads there would start runs; outputs and markers are never acted on).
    params = template["Parameters"]
    prefixes = ("UploadPrefix", "CatalogPrefix", "OutputPrefix", "TaskStoragePrefix", "EventMarkerPrefix")
    assert len({params[p]["Default"] for p in prefixes}) == len(prefixes)


def test_gpu_capacity_scales_to_zero_on_the_ecs_gpu_ami(template):
    res = template["Resources"]
    asg = res["GpuAutoScalingGroup"]["Properties"]
    assert asg["MinSize"] == "0" and asg["MaxSize"] == {"Ref": "GpuMaxInstances"}
    assert template["Parameters"]["GpuMaxInstances"]["Default"] == 5
    assert template["Parameters"]["GpuInstanceType"]["Default"] == "g5.2xlarge"
    assert "/gpu/" in template["Parameters"]["EcsGpuAmiId"]["Default"]
    provider = res["GpuCapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert provider["ManagedScaling"]["Status"] == "ENABLED" and provider["ManagedScaling"]["TargetCapacity"] == 100
    # Long-lived sessions: a scale-in must not terminate an instance whose session is running a task.
    assert provider["ManagedTerminationProtection"] == "ENABLED" and asg["NewInstancesProtectedFromScaleIn"] is True
    user_data = res["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    for line in ("ECS_CLUSTER=${Cluster}", "ECS_ENABLE_GPU_SUPPORT=true", "ECS_WARM_POOLS_CHECK=true",
                 "ECS_IMAGE_PULL_BEHAVIOR=prefer-cached"):
        assert line in user_data.splitlines(), line
    assert {"Ref": "GpuCapacityProvider"} in res["ClusterCapacityProviders"]["Properties"]["CapacityProviders"]


def test_the_warm_pool_is_optional_and_keeps_instances_stopped(template):
    params, res = template["Parameters"], template["Resources"]
    assert params["EnableWarmPool"]["Default"] == "false"
    assert set(params["EnableWarmPool"]["AllowedValues"]) == {"true", "false"}
    assert template["Conditions"]["WarmPoolEnabled"] == {"Fn::Equals": [{"Ref": "EnableWarmPool"}, "true"]}
    pool = res["GpuWarmPool"]
    assert pool["Type"] == "AWS::AutoScaling::WarmPool" and pool["Condition"] == "WarmPoolEnabled"
    props = pool["Properties"]
    assert props["AutoScalingGroupName"] == {"Ref": "GpuAutoScalingGroup"}
    assert props["PoolState"] == "Stopped" and props["MinSize"] == {"Ref": "WarmPoolMinSize"}
    assert "InstanceReusePolicy" not in props  # ECS does not allow ReuseOnScaleIn
    # The launch hook exists only with the pool; the instance completes it under the same names.
    condition, [hook], no_value = res["GpuAutoScalingGroup"]["Properties"]["LifecycleHookSpecificationList"]["Fn::If"]
    assert condition == "WarmPoolEnabled" and no_value == {"Ref": "AWS::NoValue"}
    assert hook["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING" and hook["DefaultResult"] == "CONTINUE"
    script = _instance_ready_script(template, warm_pool="true", image="")
    assert f"--lifecycle-hook-name {hook['LifecycleHookName']} " in script
    asg_name = res["GpuAutoScalingGroup"]["Properties"]["AutoScalingGroupName"]["Fn::Sub"]
    assert asg_name == "${ProjectName}-gpu"
    instance_policy = res["GpuInstanceRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
    [complete] = [st for st in instance_policy if st["Action"] == "autoscaling:CompleteLifecycleAction"]
    assert _resource(complete["Resource"]).endswith(f":autoScalingGroupName/{asg_name}")


def _user_data(template, **values) -> str:
    """The GPU instances' user data with the template's ${...} substituted."""
    text = template["Resources"]["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"][
        "Fn::Base64"]["Fn::Sub"]
    values = {"Cluster": "sam3d", "ProjectName": "sam3d", **values}
    return re.sub(r"\$\{([A-Za-z]+)\}", lambda m: values[m[1]], text)


def _instance_ready_script(template, *, warm_pool: str, image: str) -> str:
    user_data = _user_data(template, EnableWarmPool=warm_pool, GpuImage=image)
    return user_data.split("<<'SCRIPT'\n", 1)[1].split("\nSCRIPT\n", 1)[0] + "\n"


@pytest.mark.parametrize("state, pulls", [("Warmed:Stopped", True), ("InService", False)])
def test_instance_ready_script_pulls_only_while_warming_then_completes_the_hook(template, tmp_path, state, pulls):
    """The script the user data installs, run with curl, aws, docker and dnf replaced by recorders."""
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sam3d-gpu-worker:0.1.0"
    script = tmp_path / "sam3d-instance-ready"
    script.write_text(_instance_ready_script(template, warm_pool="true", image=image))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    stubs = {
        "curl": f"""case "$*" in
  *api/token*) echo token ;;
  *target-lifecycle-state*) echo {state} ;;
  *instance-id*) echo i-0123 ;;
  *placement/region*) echo us-east-1 ;;
  *) exit 22 ;;
esac""",
        "aws": f'echo "aws $*" >> {calls}; [ "$1 $2" = "ecr get-login-password" ] && echo secret; exit 0',
        "docker": f'cat > /dev/null; echo "docker $*" >> {calls}',
        "dnf": f'echo "dnf $*" >> {calls}',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(script)], env=env, stdin=subprocess.DEVNULL, check=True, timeout=30)
    recorded = calls.read_text().splitlines()
    assert recorded[-1] == ("aws autoscaling complete-lifecycle-action --region us-east-1 --auto-scaling-group-name "
                            "sam3d-gpu --lifecycle-hook-name prepare-gpu-instance --lifecycle-action-result CONTINUE "
                            "--instance-id i-0123")
    pulled = [c for c in recorded if c.startswith("docker pull")]
    assert pulled == ([f"docker pull {image}"] if pulls else [])
    if pulls:
        assert "docker login --username AWS --password-stdin 123456789012.dkr.ecr.us-east-1.amazonaws.com" in recorded
    assert not any(c.startswith("dnf") for c in recorded)  # the AMI's own aws CLI is used when it has one


def test_without_the_warm_pool_the_user_data_installs_nothing(template, tmp_path):
    user_data = _user_data(template, EnableWarmPool="false", GpuImage="")
    path = tmp_path / "user-data.sh"
    path.write_text(user_data)
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    assert 'if [ "false" = "true" ]; then' in user_data


def test_cpu_pool_process_worker_is_an_always_on_service_with_the_flow_role(template):
    res, params = template["Resources"], template["Parameters"]
    assert params["CpuPoolType"]["Default"] == "process"
    for name in ("CpuFlowWorkerTaskDefinition", "CpuFlowWorkerService"):
        assert res[name]["Condition"] == "CpuPoolIsProcess"
    service = res["CpuFlowWorkerService"]["Properties"]
    assert service["DesiredCount"] == 1 and service["LaunchType"] == "FARGATE"
    task = res["CpuFlowWorkerTaskDefinition"]["Properties"]
    assert task["TaskRoleArn"] == {"Fn::GetAtt": ["CpuFlowTaskRole", "Arn"]}  # pipeline data only
    assert task["ExecutionRoleArn"] == {"Fn::GetAtt": ["TaskExecutionRole", "Arn"]}
    [container] = task["ContainerDefinitions"]
    command = container["Command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--type") + 1] == "process"
    assert command[command.index("--pool") + 1] == {"Fn::Sub": "${ProjectName}-cpu"}
    assert container["Image"] == {"Ref": "FlowImage"}
    assert container["LogConfiguration"]["Options"]["awslogs-group"] == {"Ref": "CpuFlowLogGroup"}
    assert [s["Name"] for s in container["Secrets"]] == ["PREFECT_API_KEY"]
    env = {e["Name"]: e["Value"] for e in container["Environment"] if "Name" in e}  # (an Fn::If aside)
    assert env["SAM3D_GPU_STAGES"] == "workers"
    for setting in STORAGE_SETTINGS:
        assert env[setting] == {"Ref": "TaskStorageBlock"}
    # Both sides of a background task use the same storage: the stack's default block is the GPU pool's.
    gpu_env = json.loads(GPU_TEMPLATE.read_text())["variables"]["properties"]["env"]["default"]
    assert {gpu_env[s] for s in STORAGE_SETTINGS} == {params["TaskStorageBlock"]["Default"]}
    # The ECS worker of the CPU pool (one Fargate task per flow run) exists only when chosen instead.
    workers = res["WorkerTaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert [c["Name"] for c in workers if "Name" in c] == ["gpu-pool-worker"]
    [(condition, cpu_ecs_worker, _)] = [tuple(c["Fn::If"]) for c in workers if "Fn::If" in c]
    assert condition == "CpuPoolIsEcs" and "--type" in cpu_ecs_worker["Command"]


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


GPU_SESSIONS = {"gpu-worker": ("all", ""), "gpu-worker-sam3": ("segment", "sam3d-gpu-sam3"),
                "gpu-worker-sam3d": ("reconstruct", "sam3d-gpu-sam3d")}


def _deployments() -> dict[str, dict]:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in config["deployments"]}


def test_prefect_yaml_maps_each_flow_to_its_pool(template):
    deployments = _deployments()
    assert set(deployments) == {"image-to-3d", "catalog-batch", *GPU_SESSIONS}
    pools = {name: d["work_pool"]["name"] for name, d in deployments.items()}
    assert pools == {"image-to-3d": "sam3d-cpu", "catalog-batch": "sam3d-cpu"} | dict.fromkeys(GPU_SESSIONS,
                                                                                                 "sam3d-gpu")
    # Warm GPU sessions: one GPU each, at most as many (per deployment) as the g5 group has instances. gpu-worker has
    # both models (the local stack); gpu-worker-sam3 / -sam3d serve one stage each on their own image.
    for name, (stages, image) in GPU_SESSIONS.items():
        gpu = deployments[name]
        assert gpu["entrypoint"] == "flows/gpu_worker.py:gpu_worker"
        assert gpu["concurrency_limit"] == 5 == template["Parameters"]["GpuMaxInstances"]["Default"]
        job_variables = gpu["work_pool"]["job_variables"]
        assert job_variables.get("image", "").split(":")[0] == image, name
        assert job_variables["env"]["SAM3D_GPU_STAGES"] == "workers"
        assert job_variables["env"]["SAM3D_GPU_WORKER_STAGES"] == stages
    assert "SAM3D_SAM3D_DTYPE" not in json.dumps(deployments["gpu-worker-sam3"])  # no SAM 3D Objects there
    # The GPU pool's env gives every session the stage mode, its idle timeout and the shared task storage.
    gpu_env = json.loads(GPU_TEMPLATE.read_text())["variables"]["properties"]["env"]["default"]
    assert gpu_env["SAM3D_GPU_STAGES"] == "workers" and float(gpu_env["SAM3D_GPU_IDLE_S"]) > 0
    # The CPU side reads the stage mode from its worker's environment, never from the deployment, so a local
    # process pool runs the stages inline; the ECS alternative of the CPU pool uses the same storage blocks.
    for name in ("image-to-3d", "catalog-batch"):
        assert "SAM3D_GPU_STAGES" not in json.dumps(deployments[name])
    cpu_env = json.loads(CPU_TEMPLATE.read_text())["variables"]["properties"]["env"]["default"]
    assert cpu_env["SAM3D_GPU_STAGES"] == "workers"
    # On AWS each stage starts sessions of its own image's deployment (the stack's CPU worker says the same).
    assert cpu_env["SAM3D_GPU_SEGMENT_DEPLOYMENT"] == "gpu-worker/gpu-worker-sam3"
    assert cpu_env["SAM3D_GPU_RECONSTRUCT_DEPLOYMENT"] == "gpu-worker/gpu-worker-sam3d"
    [container] = template["Resources"]["CpuFlowWorkerTaskDefinition"]["Properties"]["ContainerDefinitions"]
    worker_env = {e["Name"]: e["Value"] for e in container["Environment"] if "Name" in e}
    for setting in ("SAM3D_GPU_SEGMENT_DEPLOYMENT", "SAM3D_GPU_RECONSTRUCT_DEPLOYMENT"):
        assert worker_env[setting] == cpu_env[setting]
    assert {cpu_env[s] for s in STORAGE_SETTINGS} == {gpu_env[s] for s in STORAGE_SETTINGS}
    assert len({gpu_env[s] for s in STORAGE_SETTINGS}) == 1 and gpu_env[STORAGE_SETTINGS[0]].startswith("s3-bucket/")


def test_gpu_worker_entrypoint_is_the_session_flow():
    """Resolves the gpu-worker entrypoint by importing flows/gpu_worker.py: the name the orchestrating flows start
    (``SAM3D_GPU_WORKER_DEPLOYMENT``) and its ``idle_s`` parameter (None: SAM3D_GPU_IDLE_S)."""
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    from sam3d_pipeline.settings import Settings
    from tasks.gpu_dispatch import deployment_of

    deployments = _deployments()
    gpu = deployments["gpu-worker"]
    flow = load_flow_from_entrypoint(str(ROOT / gpu["entrypoint"]))
    assert f"{flow.name}/{gpu['name']}" == Settings().gpu_worker_deployment == "gpu-worker/gpu-worker"
    # By default both stages go to that one deployment (the local stack); on AWS each to its own image's.
    assert {deployment_of(s, Settings()) for s in ("segment", "reconstruct", "all")} == {"gpu-worker/gpu-worker"}
    aws = Settings(gpu_segment_deployment="gpu-worker/gpu-worker-sam3",
                   gpu_reconstruct_deployment="gpu-worker/gpu-worker-sam3d")
    for stage, name in (("segment", "gpu-worker-sam3"), ("reconstruct", "gpu-worker-sam3d")):
        assert deployment_of(stage, aws) == f"{flow.name}/{deployments[name]['name']}"
        assert load_flow_from_entrypoint(str(ROOT / deployments[name]["entrypoint"])).name == flow.name
    assert Settings().gpu_worker_stages == "all"
    schema = parameter_schema(flow.fn)
    idle_s = schema.properties["idle_s"]
    assert "default" in idle_s and idle_s["default"] is None
    assert {"type": "number"} in idle_s["anyOf"] and {"type": "null"} in idle_s["anyOf"]
    stages = json.dumps(schema.properties["stages"])
    assert all(s in stages for s in ("segment", "reconstruct", "all"))
    assert schema.properties["stages"]["default"] is None
    assert Settings(gpu_stages="workers").gpu_stages == "workers"


AWS_DEPLOYMENTS = ROOT / "deployments" / "prefect-aws.yaml"


def _aws_config() -> dict:
    return yaml.safe_load(AWS_DEPLOYMENTS.read_text())


def test_aws_deployments_are_the_local_ones_on_the_built_images():
    """deployments/prefect-aws.yaml repeats ../prefect.yaml's deployments (prefect.yaml stays free of build steps
    for `sam3d-pipeline up`); only the GPU image, the catalog's example parameters and its schedule differ."""
    local = _deployments()
    aws = {d["name"]: d for d in _aws_config()["deployments"]}
    assert set(aws) == set(local) - {"gpu-worker"}  # both models in one process: no such image on AWS
    for name in aws:
        mine, theirs = dict(local[name]), dict(aws[name])
        if name.startswith("gpu-worker-"):
            build = {"gpu-worker-sam3": "build-sam3-image", "gpu-worker-sam3d": "build-sam3d-image"}[name]
            assert theirs["work_pool"]["job_variables"]["image"] == f"{{{{ {build}.image }}}}"
            for d in (mine, theirs):
                d["work_pool"] = {**d["work_pool"], "job_variables": {
                    k: v for k, v in d["work_pool"]["job_variables"].items() if k != "image"}}
        if name == "catalog-batch":
            assert [s["active"] for s in theirs["schedules"]] == [False]  # until a manifest exists
            assert theirs["parameters"]["source"].startswith("s3://{{ $SAM3D_BUCKET }}/catalog/")
            for d in (mine, theirs):
                d["schedules"] = [{k: v for k, v in s.items() if k != "active"} for s in d["schedules"]]
                d["parameters"] = {k: v for k, v in d["parameters"].items() if k not in ("source", "output_root")}
        assert mine == theirs, name
    # Nothing in the local file builds anything.
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert not config.get("build") and not config.get("push")
    assert not any(d.get("build") or d.get("push") for d in config["deployments"])


def test_aws_deployments_build_and_push_both_images_the_prefect_way(template):
    import inspect

    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect_docker.deployments.steps import build_docker_image
    from python_on_whales.components.buildx.cli_wrapper import BuildxCLI

    config = _aws_config()
    PrefectYamlModel.model_validate(config)  # what `prefect deploy` validates the file with
    artifacts = (ROOT / "deployments" / "artifacts.yaml").read_text()
    own = set(inspect.signature(build_docker_image).parameters) - {"build_kwargs"}
    buildx = set(inspect.signature(BuildxCLI.build).parameters)
    pin = next(r for r in _pyproject_extra("deploy") if r.startswith("prefect-docker=="))
    builds = {}
    for step in config["build"]:
        [(fn, args)] = step.items()
        assert fn == "prefect_docker.deployments.steps.build_docker_image" and args["requires"] == pin
        assert (ROOT / args["dockerfile"]).is_file() and args["build_backend"] == "buildx"
        # Arguments build_docker_image does not take go to python-on-whales' buildx build (platform is mapped).
        extra = set(args) - own - {"id", "requires", "platform"}
        assert extra <= buildx, extra - buildx
        assert args["provenance"] is False  # a single manifest: Lambda refuses image indexes
        builds[args["id"]] = args
    assert {b["dockerfile"] for b in builds.values()} == {
        "deployments/service.Dockerfile", "gpu_worker/sam3.Dockerfile", "gpu_worker/sam3d.Dockerfile"}
    for args in builds.values():  # the repositories of deployments/artifacts.yaml (ProjectName sam3d)
        repository = args["image_name"].rsplit("/", 1)[1]
        assert "${ProjectName}-" + repository.removeprefix("sam3d-") in artifacts
    pushes = [args for step in config["push"] for fn, args in step.items()]
    assert sorted(p["image_name"] for p in pushes) == sorted(f"{{{{ {i}.image_name }}}}" for i in builds)
    assert all(p["tag"].endswith(".tag }}") for p in pushes)
    # Both images hold the project where the pull step looks for it.
    [pull] = config["pull"]
    directory = pull["prefect.deployments.steps.set_working_directory"]["directory"]
    for dockerfile in builds.values():
        text = (ROOT / dockerfile["dockerfile"]).read_text()
        assert f"WORKDIR {directory}\n" in text, dockerfile["dockerfile"]
    for name in ("build-sam3-image", "build-sam3d-image"):
        gpu = builds[name]
        assert set(gpu["build_args"]) == {"CHECKPOINT_URI"} and gpu["secrets"] == [
            "id=aws,src={{ $SAM3D_BUILD_AWS_CREDENTIALS }}"]
        assert "id=aws,target=/root/.aws/credentials" in (ROOT / gpu["dockerfile"]).read_text()


def test_flows_and_tasks_come_from_the_project_folder_not_from_site_packages():
    """The wheel ships the library alone; every image holds flows/ and tasks/ in the folder the deployments pull
    from, and names it (SAM3D_PROJECT_DIR, PYTHONPATH) for the command line and every other process."""
    import tomllib

    from setuptools import find_packages

    from tests.gpu_image import dockerfile_env

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=found["include"])
    assert "sam3d_pipeline" in packages and all(p.split(".")[0] == "sam3d_pipeline" for p in packages), packages
    directories = {yaml.safe_load(path.read_text())["pull"][0]["prefect.deployments.steps.set_working_directory"][
        "directory"] for path in (ROOT / "prefect.yaml", ROOT / "deployments" / "prefect-aws.yaml")}
    assert directories == {"{{ $SAM3D_PROJECT_DIR }}", "/opt/sam3d-pipeline"}
    for dockerfile in ("deployments/service.Dockerfile", "gpu_worker/sam3.Dockerfile", "gpu_worker/sam3d.Dockerfile"):
        text = (ROOT / dockerfile).read_text()
        env = dockerfile_env(ROOT / dockerfile)
        assert "COPY flows ./flows\n" in text and "COPY tasks ./tasks\n" in text, dockerfile
        assert "WORKDIR /opt/sam3d-pipeline\n" in text and env["SAM3D_PROJECT_DIR"] == "/opt/sam3d-pipeline", dockerfile
        assert "/opt/sam3d-pipeline" in env["PYTHONPATH"].split(":"), dockerfile
    for path in (ROOT / "prefect.yaml", ROOT / "deployments" / "prefect-aws.yaml"):
        for deployment in yaml.safe_load(path.read_text())["deployments"]:
            file, _, name = deployment["entrypoint"].partition(":")
            assert file.startswith("flows/") and f"def {name}(" in (ROOT / file).read_text(), deployment["entrypoint"]


def _pyproject_extra(name: str) -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][name]


def test_the_unresponsive_runs_automation_file_is_the_library_definition_and_prefect_accepts_it():
    from prefect.events.schemas.automations import AutomationCore, Posture

    from sam3d_pipeline.stack.unresponsive import (
        AUTOMATION_NAME,
        LOCAL_HEARTBEAT_S,
        PREFECT_DEFAULT_HEARTBEAT_S,
        unresponsive_runs_automation,
    )

    shipped = yaml.safe_load((ROOT / "deployments" / "automations.yaml").read_text())["automations"]
    assert shipped == [unresponsive_runs_automation(PREFECT_DEFAULT_HEARTBEAT_S)]  # regenerate it when this fails
    for heartbeat_s in (LOCAL_HEARTBEAT_S, PREFECT_DEFAULT_HEARTBEAT_S):
        automation = AutomationCore.model_validate(unresponsive_runs_automation(heartbeat_s))
        trigger = automation.trigger
        assert automation.name == AUTOMATION_NAME and trigger.posture == Posture.Proactive
        assert trigger.within.total_seconds() >= 3 * heartbeat_s  # a late heartbeat is not a dead run
        assert {"prefect.flow-run.Suspended", "prefect.flow-run.Completed"} <= trigger.expect
        assert automation.actions[0].type == "change-flow-run-state" and automation.actions[0].state.value == "CRASHED"
    with pytest.raises(ValueError, match="30 s"):
        unresponsive_runs_automation(10)
    readme = (ROOT / "deployments" / "README.md").read_text()
    assert "prefect automation create --from-file deployments/automations.yaml" in readme
