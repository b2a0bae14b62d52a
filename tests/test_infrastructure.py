"""The AWS stack as a deployer meets it: both templates lint and scan clean, the main template deploys into moto's
CloudFormation (over HTTP), the upload queue has a consumer, every role is used, the events bridge's role can do
exactly its job, the deployed bridge configuration turns an upload message into a Prefect event, and the non-GPU
image and its `service` extra carry no torch.

IAM is not enforced by moto, so the roles' policies are read back from moto's IAM and evaluated here (``Policy``):
Allow/Deny statements, wildcards, and the condition operators the templates use.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest

ROOT = Path(__file__).parents[1]
INFRA = ROOT / "deployments" / "infrastructure.yaml"
ARTIFACTS = ROOT / "deployments" / "artifacts.yaml"
SERVICE_DOCKERFILE = ROOT / "deployments" / "service.Dockerfile"
GPU_DOCKERFILES = (ROOT / "gpu_worker" / "sam3.Dockerfile", ROOT / "gpu_worker" / "sam3d.Dockerfile")
README = ROOT / "deployments" / "README.md"
CHECKOV = ROOT / "tools" / "scan-venv" / "bin" / "checkov"
REGION = "us-east-1"
NO_VALUE = {"Ref": "AWS::NoValue"}
# Resource types of the main template that moto's CloudFormation does not implement (it skips them with a warning);
# what they do is checked on the template itself below (bucket policy, alarm) or only in a real account.
MOTO_SKIPS = {
    "AWS::S3::BucketPolicy",
    "AWS::SQS::QueuePolicy",
    "AWS::CloudWatch::Alarm",
    "AWS::ECS::CapacityProvider",
    "AWS::ECS::ClusterCapacityProviderAssociations",
    "AWS::AutoScaling::WarmPool",
    "AWS::SecretsManager::Secret",
    "AWS::EC2::SecurityGroupEgress",
}


def _template(path: Path) -> dict:
    from cfnlint.decode import decode

    data, matches = decode(str(path))
    assert not matches, matches
    return data


# -------- conditions: CloudFormation's Fn::If / AWS::NoValue, resolved before moto sees the template -----------
# moto keeps AWS::NoValue inside lists (a None container definition), so the test picks the branches itself.
def _value(expr, template: dict, params: dict):
    if isinstance(expr, dict) and list(expr) == ["Ref"]:
        spec = template["Parameters"][expr["Ref"]]
        value = params.get(expr["Ref"], spec.get("Default"))
        if spec["Type"] == "CommaDelimitedList" or spec["Type"].startswith("List<"):
            return [] if value in ("", None) else str(value).split(",")
        return value
    if isinstance(expr, dict) and list(expr) == ["Fn::Join"]:
        sep, items = expr["Fn::Join"]
        items = _value(items, template, params) if isinstance(items, dict) else items
        return sep.join(str(_value(i, template, params)) for i in items)
    assert not isinstance(expr, dict), f"unsupported in a condition: {expr}"
    return expr


def _condition(expr, template: dict, params: dict, known: dict) -> bool:
    (fn, arg), = expr.items()
    if fn == "Fn::Equals":
        return str(_value(arg[0], template, params)) == str(_value(arg[1], template, params))
    if fn == "Fn::Not":
        return not _condition(arg[0], template, params, known)
    if fn == "Condition":
        return known[arg]
    raise AssertionError(f"unsupported condition function {fn}")


def resolve_conditions(template: dict, params: dict) -> tuple[dict, dict[str, bool]]:
    conditions: dict[str, bool] = {}
    for name, expr in template.get("Conditions", {}).items():
        conditions[name] = _condition(expr, template, params, conditions)

    def walk(node):
        if isinstance(node, dict):
            if list(node) == ["Fn::If"]:
                name, yes, no = node["Fn::If"]
                return walk(yes if conditions[name] else no)
            return {k: w for k, v in node.items() if (w := walk(v)) != NO_VALUE}
        if isinstance(node, list):
            return [w for v in node if (w := walk(v)) != NO_VALUE]
        return node

    out = {k: v for k, v in template.items() if k != "Conditions"}
    for section in ("Resources", "Outputs"):
        out[section] = {
            name: walk({k: v for k, v in body.items() if k != "Condition"})
            for name, body in template.get(section, {}).items()
            if conditions.get(body.get("Condition"), True)
        }
    return out, conditions


# -------- a small IAM evaluator -----------------------------------------------------------------------------
def _patterns(value) -> list[str]:
    return value if isinstance(value, list) else [value]


def _like(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


def _condition_holds(condition: dict, context: dict[str, str]) -> bool:
    for operator, tests in condition.items():
        for key, expected in tests.items():
            actual = context.get(key)
            if actual is None:
                return False
            expected = [str(e).lower() if operator == "Bool" else str(e) for e in _patterns(expected)]
            if operator in ("StringEquals", "ArnEquals", "Bool"):
                ok = actual in expected
            elif operator in ("StringLike", "ArnLike"):
                ok = any(_like(e, actual) for e in expected)
            else:
                raise AssertionError(f"condition operator {operator} is not evaluated here")
            if not ok:
                return False
    return True


@dataclass
class Policy:
    """The statements of one principal (or one resource policy)."""

    statements: list[dict] = field(default_factory=list)

    def _matching(self, effect: str, action: str, resource: str, context: dict[str, str]) -> bool:
        for st in self.statements:
            if st["Effect"] != effect:
                continue
            if not any(_like(p.lower(), action.lower()) for p in _patterns(st["Action"])):
                continue
            if not any(_like(p, resource) for p in _patterns(st.get("Resource", "*"))):
                continue
            if "Condition" in st and not _condition_holds(st["Condition"], context):
                continue
            return True
        return False

    def allows(self, action: str, resource: str, **context: str) -> bool:
        if self._matching("Deny", action, resource, context):
            return False
        return self._matching("Allow", action, resource, context)

    def denies(self, action: str, resource: str, **context: str) -> bool:
        return self._matching("Deny", action, resource, context)


def _document(doc) -> dict:
    """A policy document as boto3 returns it: a dict, URL-encoded JSON, or (inline role policies that moto's
    CloudFormation created) the Python repr of a dict."""
    if isinstance(doc, str):
        import ast
        from urllib.parse import unquote

        text = unquote(doc)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = ast.literal_eval(text)
    return doc


def role_policy(stack: Deployed, logical: str) -> Policy:
    """Every identity statement of a role of the stack as moto stores it (intrinsics resolved): its inline policies,
    and the customer managed policies its ``ManagedPolicyArns`` names (moto's CloudFormation creates those policies
    but does not attach them, so the names come from the deployed template)."""
    iam = stack.client("iam")
    role_name = stack.role(logical)[0]
    statements: list[dict] = []
    for name in iam.list_role_policies(RoleName=role_name)["PolicyNames"]:
        statements += _document(iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"])[
            "Statement"]
    attached = {a["PolicyArn"] for a in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]}
    for ref in stack.template["Resources"][logical]["Properties"].get("ManagedPolicyArns", []):
        if isinstance(ref, dict) and "Ref" in ref:
            attached.add(stack.physical[ref["Ref"]])
    for arn in attached:
        version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
        statements += _document(iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"][
            "Document"])["Statement"]
    # AWS managed policies (ECS execution, ECS instance, SSM; named as Fn::Sub strings) are AWS's, not judged here.
    for st in statements:
        st.setdefault("Resource", "*")
    return Policy(statements)


# -------- deploying into moto ------------------------------------------------------------------------------
@dataclass
class Deployed:
    name: str
    params: dict
    template: dict  # the resolved template moto received
    conditions: dict[str, bool]
    outputs: dict[str, str]
    physical: dict[str, str]  # logical id → physical id, resources moto created
    statuses: dict[str, str]
    clients: object

    def client(self, service: str):
        return self.clients(service)

    def role(self, logical: str) -> tuple[str, str]:
        name = self.physical[logical]
        return name, self.client("iam").get_role(RoleName=name)["Role"]["Arn"]

    def task_roles(self, task_definition: str) -> dict[str, str]:
        """taskRoleArn and executionRoleArn of a task definition of the stack (by logical id or ARN) as role ARNs
        in moto. moto's CloudFormation drops these two properties when it registers the task definition, so they
        come from the template moto deployed, resolved to the roles moto created."""
        logical = next(name for name, arn in self.physical.items() if task_definition in (name, arn))
        props = self.template["Resources"][logical]["Properties"]
        return {key: self.role(props[prop]["Fn::GetAtt"][0])[1]
                for key, prop in (("taskRoleArn", "TaskRoleArn"), ("executionRoleArn", "ExecutionRoleArn"))}

    def queue_arn(self, logical: str) -> str:
        url = self.physical[logical]
        return self.client("sqs").get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"]


@pytest.fixture(scope="module")
def clients(moto_server):
    def make(service: str):
        return boto3.client(service, endpoint_url=moto_server.url, region_name=REGION)

    return make


@pytest.fixture(scope="module")
def network(clients):
    ec2 = clients("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24", AvailabilityZone=f"{REGION}{zone}")[
        "Subnet"]["SubnetId"] for i, zone in enumerate("ab")]
    key = clients("secretsmanager").create_secret(Name=f"prefect-key-{uuid.uuid4().hex[:8]}",
                                                  SecretString="pnu_test")["ARN"]
    certificate = clients("acm").request_certificate(DomainName="sam3d.example.com")["CertificateArn"]
    return {"vpc": vpc, "subnets": subnets, "prefect_key": key, "certificate": certificate}


def deploy(clients, network, **overrides: str) -> Deployed:
    suffix = uuid.uuid4().hex[:8]
    params = {
        "ProjectName": f"t{suffix}",
        "BucketName": f"photos-{suffix}",
        "CheckpointBucket": f"checkpoints-{suffix}",
        "Sam3CheckpointSha256": "a" * 64,
        "Sam3dCheckpointSha256": "b" * 64,
        "VpcId": network["vpc"],
        "SubnetIds": ",".join(network["subnets"]),
        "FlowImage": f"123456789012.dkr.ecr.{REGION}.amazonaws.com/sam3d-pipeline:0.1.0-test",
        "PrefectApiUrl": "https://prefect.example.com/api",
        "PrefectApiKeySecretArn": network["prefect_key"],
        **overrides,
    }
    resolved, conditions = resolve_conditions(_template(INFRA), params)
    cf = clients("cloudformation")
    name = f"sam3d-{suffix}"
    cf.create_stack(StackName=name, TemplateBody=json.dumps(resolved), Capabilities=["CAPABILITY_IAM"],
                    Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()])
    stack = cf.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    summaries = cf.list_stack_resources(StackName=name)["StackResourceSummaries"]
    return Deployed(
        name=name, params=params, template=resolved, conditions=conditions,
        outputs={o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])},
        physical={s["LogicalResourceId"]: s["PhysicalResourceId"] for s in summaries if "LogicalResourceId" in s},
        statuses={s["LogicalResourceId"]: s["ResourceStatus"] for s in summaries if "LogicalResourceId" in s},
        clients=clients,
    )


@pytest.fixture(scope="module")
def stacks(clients, network):
    """The default stack (events bridge as an ECS service, no web server) and every option switched the other
    way (Lambda bridge, web server, ECS CPU pool, warm pool)."""
    return {
        "service": deploy(clients, network),
        "lambda": deploy(clients, network, EventsBridgeMode="lambda", WebCertificateArn=network["certificate"],
                         ReviewPageOrigin="https://sam3d.example.com", CpuPoolType="ecs", EnableWarmPool="true",
                         AlarmEmail="ops@example.com"),
    }


@pytest.mark.parametrize("mode", ["service", "lambda"])
def test_moto_creates_every_resource_it_implements(stacks, mode):
    from moto.cloudformation.parsing import get_model_map

    stack = stacks[mode]
    types = {name: body["Type"] for name, body in stack.template["Resources"].items()}
    skipped = {t for t in types.values() if t not in get_model_map()}
    assert skipped <= MOTO_SKIPS, f"moto skips more than recorded: {skipped - MOTO_SKIPS}"
    created = {name for name, t in types.items() if t in get_model_map()}
    assert created <= set(stack.physical), sorted(created - set(stack.physical))
    assert all(stack.statuses[name] == "CREATE_COMPLETE" for name in created)
    web = {"WebService", "WebLoadBalancer", "WebListener", "WebTaskDefinition"}
    assert (web <= created) == (mode == "lambda") and (web & created) in (set(), web)


@pytest.mark.parametrize("mode", ["service", "lambda"])
def test_the_upload_queue_has_exactly_one_consumer(stacks, mode):
    stack = stacks[mode]
    queue_url, queue_arn = stack.outputs["UploadQueueUrl"], stack.queue_arn("UploadQueue")
    assert queue_url == stack.physical["UploadQueue"]
    ecs, lam = stack.client("ecs"), stack.client("lambda")
    consumers = []
    cluster = stack.physical["Cluster"]
    for service_arn in ecs.list_services(cluster=cluster)["serviceArns"]:
        [service] = ecs.describe_services(cluster=cluster, services=[service_arn])["services"]
        task = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])["taskDefinition"]
        for container in task["containerDefinitions"]:
            if queue_url in container.get("command", []):
                role = stack.task_roles(service["taskDefinition"])["taskRoleArn"]
                consumers.append(("service", container["command"], role, service["desiredCount"]))
    for mapping in lam.list_event_source_mappings(EventSourceArn=queue_arn)["EventSourceMappings"]:
        function = lam.get_function(FunctionName=mapping["FunctionArn"])["Configuration"]
        consumers.append(("lambda", mapping, function, None))
    assert len(consumers) == 1, consumers
    [(kind, how, role_or_function, desired)] = consumers
    assert kind == mode
    if kind == "service":
        assert how[:2] == ["sam3d-pipeline", "events-bridge"] and how[how.index("--queue-url") + 1] == queue_url
        assert role_or_function == stack.role("EventsBridgeTaskRole")[1] and desired == 1
    else:
        assert "ReportBatchItemFailures" in how["FunctionResponseTypes"] and how["BatchSize"] <= 10
        assert role_or_function["Role"] == stack.role("EventsBridgeFunctionRole")[1]
        image = stack.template["Resources"]["EventsBridgeFunction"]["Properties"]["ImageConfig"]
        module, function = image["Command"][0].rsplit(".", 1)
        handler = Path(image["WorkingDirectory"].replace("/opt/sam3d-pipeline", str(ROOT))) / f"{module}.py"
        assert f"def {function}(" in handler.read_text()
        # The queue hides a message longer than the function may take (AWS refuses the mapping otherwise).
        visibility = stack.client("sqs").get_queue_attributes(QueueUrl=queue_url, AttributeNames=[
            "VisibilityTimeout"])["Attributes"]["VisibilityTimeout"]
        assert int(visibility) >= role_or_function["Timeout"]


def _role_uses(stack: Deployed) -> dict[str, list[str]]:
    """Role ARN → what uses it: task definitions, Lambda functions, the GPU instances' profile, and the roles the
    Prefect ECS worker passes to the tasks it starts (named by stack outputs that the pool setup consumes)."""
    uses: dict[str, list[str]] = {}
    ecs, iam = stack.client("ecs"), stack.client("iam")
    for logical, body in stack.template["Resources"].items():
        if body["Type"] == "AWS::ECS::TaskDefinition":
            ecs.describe_task_definition(taskDefinition=stack.physical[logical])  # registered in moto
            for key, arn in stack.task_roles(logical).items():
                uses.setdefault(arn, []).append(f"{logical}.{key}")
        elif body["Type"] == "AWS::Lambda::Function":
            role = stack.client("lambda").get_function(FunctionName=stack.physical[logical])["Configuration"]["Role"]
            uses.setdefault(role, []).append(logical)
    template = stack.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=stack.physical["GpuLaunchTemplate"])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    asg = stack.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[stack.physical["GpuAutoScalingGroup"]])["AutoScalingGroups"][0]
    assert asg["LaunchTemplate"]["LaunchTemplateId"] == stack.physical["GpuLaunchTemplate"]
    profile_arn = template["IamInstanceProfile"]["Arn"]
    for role in iam.get_instance_profile(InstanceProfileName=stack.physical["GpuInstanceProfile"])[
            "InstanceProfile"]["Roles"]:
        if profile_arn.endswith(f"/{stack.physical['GpuInstanceProfile']}"):
            uses.setdefault(role["Arn"], []).append("GpuLaunchTemplate (instance profile)")
    worker = role_policy(stack, "WorkerTaskRole")
    readme = README.read_text()
    for key, arn in stack.outputs.items():
        if key.endswith("RoleArn") and key in readme and worker.allows("iam:PassRole", arn):
            uses.setdefault(arn, []).append(f"a work pool's job template ({key}, passed by the ECS worker)")
    return uses


@pytest.mark.parametrize("mode", ["service", "lambda"])
def test_every_role_is_used_by_something(stacks, mode):
    stack = stacks[mode]
    uses = _role_uses(stack)
    roles = [name for name, body in stack.template["Resources"].items() if body["Type"] == "AWS::IAM::Role"]
    assert len(roles) >= 6
    unused = [name for name in roles if not uses.get(stack.role(name)[1])]
    assert not unused, f"roles nothing uses: {unused}"
    # The data roles of the GPU sessions and of the flows are used by exactly one kind of workload each.
    assert any("GpuStageTaskRoleArn" in u for u in uses[stack.role("GpuStageTaskRole")[1]])
    bridge_role = "EventsBridgeTaskRole" if mode == "service" else "EventsBridgeFunctionRole"
    assert len(uses[stack.role(bridge_role)[1]]) == 1


def _probes(stack: Deployed) -> list[tuple[str, str, dict]]:
    """(action, resource, context) to ask every role about: each action the template names, and a few dangerous
    ones, against every resource of the stack that a policy could name."""
    p = stack.params
    bucket, ckpt = p["BucketName"], p["CheckpointBucket"]
    defaults = {k: v.get("Default") for k, v in _template(INFRA)["Parameters"].items()}
    prefixes = [defaults[k] for k in ("UploadPrefix", "CatalogPrefix", "OutputPrefix", "TaskStoragePrefix",
                                      "EventMarkerPrefix")] + ["elsewhere/"]
    actions = {a for body in _template(INFRA)["Resources"].values()
               for a in re.findall(r"'((?:s3|sqs|iam|ecs|logs|secretsmanager|ec2|autoscaling):[A-Za-z*]+)'",
                                   str(body))}
    actions |= {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket", "sqs:SendMessage",
                "sqs:PurgeQueue", "sqs:ReceiveMessage", "iam:PassRole", "secretsmanager:GetSecretValue",
                "logs:PutLogEvents", "ecs:RunTask", "lambda:InvokeFunction", "kms:Decrypt"}
    resources = [f"arn:aws:s3:::{bucket}/{prefix}x.jpg" for prefix in prefixes]
    resources += [f"arn:aws:s3:::{ckpt}/{defaults['CheckpointPrefix']}sam3/sam3.pt", f"arn:aws:s3:::{ckpt}/x"]
    resources += [stack.queue_arn("UploadQueue"), stack.queue_arn("UploadDeadLetterQueue"), p["PrefectApiKeySecretArn"],
                  "*"]
    resources += [stack.role(name)[1] for name, body in stack.template["Resources"].items()
                  if body["Type"] == "AWS::IAM::Role"]
    resources += [f"arn:aws:logs:{REGION}:123456789012:log-group:{stack.physical[name]}:log-stream:x"
                  for name, body in stack.template["Resources"].items() if body["Type"] == "AWS::Logs::LogGroup"]
    probes = [(a, r, {}) for a in sorted(actions) for r in resources]
    for b, prefix in [(bucket, x) for x in prefixes] + [(ckpt, defaults["CheckpointPrefix"]), (ckpt, "")]:
        probes.append(("s3:ListBucket", f"arn:aws:s3:::{b}", {"s3:prefix": f"{prefix}x"}))
    return probes


def _allowed(policy: Policy, probes) -> set[tuple[str, str, str]]:
    return {(a, r, c.get("s3:prefix", "")) for a, r, c in probes if policy.allows(a, r, **c)}


@pytest.mark.parametrize("mode", ["service", "lambda"])
def test_the_bridge_role_consumes_the_queue_and_writes_markers_and_nothing_else(stacks, mode):
    stack = stacks[mode]
    iam = stack.client("iam")
    logical = "EventsBridgeTaskRole" if mode == "service" else "EventsBridgeFunctionRole"
    role_name = stack.role(logical)[0]
    allowed = _allowed(role_policy(stack, logical), _probes(stack))
    bucket, queue = stack.params["BucketName"], stack.queue_arn("UploadQueue")
    expected = {(a, queue, "") for a in ("sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
                                         "sqs:GetQueueAttributes")}
    expected |= {("s3:GetObject", f"arn:aws:s3:::{bucket}/photos/x.jpg", ""),  # HEAD: the `prompt` metadata
                 ("s3:GetObject", f"arn:aws:s3:::{bucket}/event-markers/x.jpg", ""),
                 ("s3:PutObject", f"arn:aws:s3:::{bucket}/event-markers/x.jpg", ""),
                 ("s3:ListBucket", f"arn:aws:s3:::{bucket}", "photos/x"),  # a missing key answers 404, not 403
                 ("s3:ListBucket", f"arn:aws:s3:::{bucket}", "event-markers/x")}
    if mode == "lambda":  # Lambda writes its own logs and reads the Prefect key itself
        group = stack.physical["EventsBridgeLogGroup"]
        log_group = f"arn:aws:logs:{REGION}:123456789012:log-group:{group}:log-stream:x"
        expected |= {("logs:CreateLogStream", log_group, ""), ("logs:PutLogEvents", log_group, ""),
                     ("secretsmanager:GetSecretValue", stack.params["PrefectApiKeySecretArn"], "")}
    assert allowed == expected, {"missing": expected - allowed, "extra": allowed - expected}
    trust = _document(iam.get_role(RoleName=role_name)["Role"]["AssumeRolePolicyDocument"])["Statement"]
    principals = {st["Principal"]["Service"] for st in trust}
    assert principals == {"ecs-tasks.amazonaws.com" if mode == "service" else "lambda.amazonaws.com"}


def test_gpu_sessions_read_checkpoints_and_pipeline_data_only(stacks):
    stack = stacks["service"]
    allowed = _allowed(role_policy(stack, "GpuStageTaskRole"), _probes(stack))
    bucket, ckpt = stack.params["BucketName"], stack.params["CheckpointBucket"]
    checkpoint = f"arn:aws:s3:::{ckpt}/checkpoints/sam3/sam3.pt"
    assert ("s3:GetObject", checkpoint, "") in allowed
    assert ("s3:ListBucket", f"arn:aws:s3:::{ckpt}", "checkpoints/x") in allowed
    writes = {(a, r) for a, r, _ in allowed if a in ("s3:PutObject", "s3:DeleteObject")}
    assert {r for _, r in writes} == {f"arn:aws:s3:::{bucket}/outputs/x.jpg",
                                      f"arn:aws:s3:::{bucket}/prefect-tasks/x.jpg"}
    assert not any(a.startswith(("sqs:", "iam:", "ecs:", "secretsmanager:")) for a, _, _ in allowed)
    assert ("s3:GetObject", f"arn:aws:s3:::{ckpt}/x", "") not in allowed
    assert ("s3:GetObject", f"arn:aws:s3:::{bucket}/event-markers/x.jpg", "") not in allowed


def test_buckets_refuse_every_request_without_tls():
    for path, logical in ((INFRA, "PhotoBucketPolicy"), (ARTIFACTS, "CheckpointBucketPolicy")):
        body = _template(path)["Resources"][logical]["Properties"]
        arn = "arn:aws:s3:::b"
        statements = json.loads(json.dumps(body["PolicyDocument"]["Statement"]).replace(
            '{"Fn::GetAtt": ["PhotoBucket", "Arn"]}', f'"{arn}"').replace(
            '{"Fn::GetAtt": ["CheckpointBucket", "Arn"]}', f'"{arn}"'))
        for st in statements:
            st["Resource"] = [r["Fn::Sub"].replace("${PhotoBucket.Arn}", arn).replace("${CheckpointBucket.Arn}", arn)
                              if isinstance(r, dict) else r for r in _patterns(st["Resource"])]
        policy = Policy(statements)
        for action, resource in (("s3:GetObject", f"{arn}/photos/x.jpg"), ("s3:PutObject", f"{arn}/k"),
                                 ("s3:ListBucket", arn)):
            assert policy.denies(action, resource, **{"aws:SecureTransport": "false"}), (logical, action)
            assert not policy.denies(action, resource, **{"aws:SecureTransport": "true"}), (logical, action)


def test_gpu_instances_keep_the_instance_role_from_their_containers():
    """IMDSv2 only, one hop: the ECS agent on the host reaches the instance metadata, a container behind the
    bridge network (one hop further) gets no instance-role credentials, only its task role's."""
    options = _template(INFRA)["Resources"]["GpuLaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert options["HttpTokens"] == "required"
    assert options["HttpPutResponseHopLimit"] == 1
    assert options.get("HttpEndpoint", "enabled") == "enabled"  # the ECS agent needs it


def test_failed_uploads_land_in_an_alarmed_dead_letter_queue(stacks):
    stack = stacks["service"]
    attributes = stack.client("sqs").get_queue_attributes(QueueUrl=stack.outputs["UploadQueueUrl"],
                                                          AttributeNames=["RedrivePolicy"])["Attributes"]
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == stack.queue_arn("UploadDeadLetterQueue")
    assert int(redrive["maxReceiveCount"]) >= 3
    alarm = stack.template["Resources"]["UploadDeadLetterAlarm"]["Properties"]  # moto has no CloudWatch alarms
    assert alarm["Namespace"] == "AWS/SQS" and alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["UploadDeadLetterQueue",
                                                                                   "QueueName"]}}]
    assert alarm["Threshold"] == 0 and alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}] and "AlarmTopic" in stack.physical
    def subscribers(deployed: Deployed) -> list[tuple[str, str]]:
        topic = deployed.physical["AlarmTopic"]
        found = deployed.client("sns").list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
        return [(s["Protocol"], s["Endpoint"]) for s in found]

    assert subscribers(stack) == []  # no AlarmEmail
    assert subscribers(stacks["lambda"]) == [("email", "ops@example.com")]


@pytest.mark.slow
def test_the_deployed_bridge_turns_an_upload_message_into_a_prefect_event(stacks, moto_server, prefect_server,
                                                                          tmp_path):
    """The events bridge exactly as the stack's task definition runs it (command and environment), against the
    stack's queue and bucket in moto and a real Prefect server."""
    from prefect.settings import PREFECT_API_URL

    stack = stacks["service"]
    ecs = stack.client("ecs")
    [container] = ecs.describe_task_definition(taskDefinition=stack.physical["EventsBridgeTaskDefinition"])[
        "taskDefinition"]["containerDefinitions"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    bucket = stack.params["BucketName"]
    key = f"photos/{uuid.uuid4().hex[:6]} chair.jpg"
    s3, sqs = stack.client("s3"), stack.client("sqs")
    etag = s3.put_object(Bucket=bucket, Key=key, Body=b"\xff\xd8 not really a jpeg", Metadata={"prompt": "chair"})[
        "ETag"].strip('"')
    event = {"version": "0", "id": str(uuid.uuid4()), "detail-type": "Object Created", "source": "aws.s3",
             "account": "123456789012", "time": "2026-12-02T10:00:00Z", "region": REGION,
             "resources": [f"arn:aws:s3:::{bucket}"],
             "detail": {"version": "0", "bucket": {"name": bucket},
                        "object": {"key": key, "size": 21, "etag": etag, "sequencer": "0062E99A88DC407460"},
                        "request-id": "R", "requester": "123456789012", "reason": "PutObject"}}
    queue_url = container["command"][container["command"].index("--queue-url") + 1]
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(event))
    run_env = {**os.environ, **env, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path),
               "AWS_ENDPOINT_URL": moto_server.url, "SAM3D_BRIDGE_WAIT_S": "1"}
    command = [sys.executable, "-m", "sam3d_pipeline.cli", *container["command"][1:], "--max-messages", "1"]
    assert container["command"][0] == "sam3d-pipeline"
    done = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    marker_prefix = env["SAM3D_EVENT_MARKER_ROOT"].removeprefix(f"s3://{bucket}/")
    markers = s3.list_objects_v2(Bucket=bucket, Prefix=marker_prefix).get("Contents", [])
    assert len(markers) == 1, done.stderr[-3000:]
    posted = json.loads(s3.get_object(Bucket=bucket, Key=markers[0]["Key"])["Body"].read())
    assert posted["event"] == "aws.s3.object.created"
    assert posted["payload"]["key"] == key and posted["payload"]["prompt"] == "chair"
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


# -------- static checks of both templates ------------------------------------------------------------------
def test_artifacts_template_passes_cfn_lint_and_keeps_tags_immutable():
    from cfnlint.api import lint_file

    matches = lint_file(ARTIFACTS)
    assert not matches, "\n".join(str(m) for m in matches)
    res = _template(ARTIFACTS)["Resources"]
    for name in ("ServiceRepository", "Sam3Repository", "Sam3dRepository"):
        props = res[name]["Properties"]
        assert props["ImageTagMutability"] == "IMMUTABLE" and props["ImageScanningConfiguration"]["ScanOnPush"]
    # The names the main stack and prefect-aws.yaml use (one repository per GPU image).
    assert res["ServiceRepository"]["Properties"]["RepositoryName"] == {"Fn::Sub": "${ProjectName}-pipeline"}
    assert res["Sam3Repository"]["Properties"]["RepositoryName"] == {"Fn::Sub": "${ProjectName}-gpu-sam3"}
    assert res["Sam3dRepository"]["Properties"]["RepositoryName"] == {"Fn::Sub": "${ProjectName}-gpu-sam3d"}


def _declared_skips(path: Path) -> dict[tuple[str, str], str]:
    skips = {}
    for name, body in _template(path)["Resources"].items():
        for skip in body.get("Metadata", {}).get("checkov", {}).get("skip", []):
            skips[(f"{body['Type']}.{name}", skip["id"])] = skip.get("comment", "")
    return skips


def test_checkov_finds_nothing_and_every_skip_is_answered():
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run `make scan-tools` (checkov in its own virtual environment)")
    done = subprocess.run([str(CHECKOV), "-f", str(INFRA), "-f", str(ARTIFACTS), "--framework", "cloudformation",
                           "--skip-download", "--output", "json"], capture_output=True, text=True, timeout=180)
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, failed
    skipped = {(c["resource"], c["check_id"]) for r in reports for c in r["results"]["skipped_checks"]}
    declared = _declared_skips(INFRA) | _declared_skips(ARTIFACTS)
    assert skipped == set(declared), {"unused skips": set(declared) - skipped, "unknown": skipped - set(declared)}
    assert all(len(comment) >= 40 for comment in declared.values()), "every skip says why"
    passed = sum(len(r["results"]["passed_checks"]) for r in reports)
    assert passed > 100


# -------- the non-GPU image -----------------------------------------------------------------------------------
GPU_LIBRARIES = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|sam3|open-clip-torch)$")


def _closure(requirements: list[str]) -> tuple[dict[str, str], list[str]]:
    """Every distribution the requirements pull in, with the versions installed here (markers and extras
    followed), and the requirements this environment cannot satisfy."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, str] = {}
    problems: list[str] = []
    seen: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            problems.append(f"{req} is not installed here")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{req}: {dist.version} installed")
        found[name] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(dep)
    return found, problems


def test_the_service_extra_resolves_without_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    service = project["optional-dependencies"]["service"]
    assert all("==" in r for r in service), "the image's own additions are pinned"
    from packaging.markers import Marker  # noqa: F401 (packaging is what pip resolves markers with)
    from packaging.requirements import Requirement

    roots = [r for r in project["dependencies"] + service
             if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})]
    found, problems = _closure(roots)
    assert not problems, problems
    assert {"prefect", "prefect-aws", "awslambdaric", "fastapi", "uvicorn", "boto3"} <= set(found)
    heavy = sorted(n for n in found if GPU_LIBRARIES.match(n))
    assert not heavy, f"the service extra pulls in {heavy}"
    # The same walk does find torch through the sam3 extra, so the check above can fail.
    sam3, _ = _closure(project["optional-dependencies"]["sam3"])
    assert "torch" in sam3


@pytest.mark.slow
def test_what_the_service_image_runs_imports_without_torch():
    code = (
        "import importlib.util, sys\n"
        "import sam3d_pipeline.cli.main, sam3d_pipeline.events.bridge, sam3d_pipeline.review.server\n"
        "import flows.image_to_3d, flows.catalog_batch\n"
        "spec = importlib.util.spec_from_file_location('handler', 'deployments/lambda/handler.py')\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'triton', 'sam3'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PREFECT_HOME": "/tmp/sam3d-import-check"})
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_service_dockerfile_is_hadolint_clean_slim_pinned_and_non_root():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--no-color", str(SERVICE_DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = SERVICE_DOCKERFILE.read_text()
    bases = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", bases["PYTHON_IMAGE"])
    assert re.fullmatch(r"node:\d+\.\d+\.\d+-bookworm-slim(@sha256:[0-9a-f]{64})?", bases["NODE_IMAGE"])
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert '--editable ".[service]"' in text
    # The browser assets land where the code reads them, relative to the package.
    from sam3d_pipeline.review.server import ORT_DIST

    for source in (ORT_DIST, ROOT / "sam3d_pipeline" / "gallery" / "node_modules" / "@google" / "model-viewer"
                   / "dist"):
        relative = Path(source).resolve().relative_to(ROOT)
        assert f"./{relative}" in text.replace("\\\n     ", ""), relative


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = Path(path).parts
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p)
                   or (p.startswith("**/") and any(fnmatch.fnmatch(x, p[3:]) for x in parts)) for p in patterns)

    for dockerfile in (SERVICE_DOCKERFILE, *GPU_DOCKERFILES):
        copies = re.findall(r"^COPY (?!--from)(.+?)\s+\S+$", dockerfile.read_text(), re.M)
        sources = [s for line in copies for s in line.split()]
        assert sources, dockerfile
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not ignored(source), f"{dockerfile.name} copies {source}, which .dockerignore drops"
    for local in (".venv", "sam3d_pipeline/review/web/node_modules", ".git", "tests"):
        assert ignored(local), local


def test_the_lambda_reads_the_prefect_key_from_secrets_manager(moto_server, monkeypatch):
    import importlib.util

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    arn = boto3.client("secretsmanager", endpoint_url=moto_server.url).create_secret(
        Name=f"key-{uuid.uuid4().hex[:8]}", SecretString="pnu_from_secrets_manager\n")["ARN"]
    path = ROOT / "deployments" / "lambda" / "handler.py"
    spec = importlib.util.spec_from_file_location("sam3d_lambda_handler", path)
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    monkeypatch.setenv("PREFECT_API_KEY", "pnu_plain")
    assert handler.prefect_api_key() == "pnu_plain"
    monkeypatch.setenv("PREFECT_API_KEY_SECRET_ARN", arn)
    assert handler.prefect_api_key() == "pnu_from_secrets_manager"
    # The stack's function gets the ARN, never the key.
    env = _template(INFRA)["Resources"]["EventsBridgeFunction"]["Properties"]["Environment"]["Variables"]
    assert env["PREFECT_API_KEY_SECRET_ARN"] == {"Ref": "PrefectApiKeySecretArn"} and "PREFECT_API_KEY" not in env


def test_readme_walkthrough_names_every_command_and_what_it_creates():
    """Every command of the walk-through is in a code block and followed by what it creates; the stack parameters
    it passes exist; each template and file it names is in the repository."""
    text = README.read_text()
    section = text[text.index("## From an empty account"):]
    section = section[: section.index("\n## ", 5)]
    steps = re.findall(r"^(\d+)\. (.+?)\n```bash\n(.+?)\n```\n(?:\s*\n)?Creates: (.+?)$", section, re.M | re.S)
    assert len(steps) >= 10, len(steps)
    assert [int(n) for n, *_ in steps] == list(range(1, len(steps) + 1))
    commands = "\n".join(body for _, _, body, _ in steps)
    for needed in ("aws secretsmanager create-secret", "aws cloudformation deploy", "deployments/artifacts.yaml",
                   "deployments/infrastructure.yaml", "prefect work-pool create sam3d-cpu",
                   "prefect work-pool create sam3d-gpu", "docker login", "--prefect-file deployments/prefect-aws.yaml",
                   "prefect work-pool update sam3d-gpu", "aws s3 cp", "object.glb"):
        assert needed in commands, needed
    [stack_step] = [body for _, _, body, _ in steps if "--template-file deployments/infrastructure.yaml" in body]
    overrides = stack_step.split("--parameter-overrides", 1)[1]
    passed = set(re.findall(r"\b([A-Z][A-Za-z0-9]+)=", overrides))
    required = {name for name, spec in _template(INFRA)["Parameters"].items() if "Default" not in spec}
    assert passed <= set(_template(INFRA)["Parameters"]), passed - set(_template(INFRA)["Parameters"])
    assert required - {"VpcId", "SubnetIds"} <= passed and {"VpcId", "SubnetIds"} <= passed, required - passed
    for path in re.findall(r"(deployments/[\w./-]+|gpu_worker/[\w./-]+)", commands):
        assert (ROOT / path.rstrip(".")).exists(), path

