from tests.test_infrastructure import *  # noqa

def test_dbg(stacks):
    s = stacks["service"]
    iam = s.client("iam")
    name = s.role("EventsBridgeTaskRole")[0]
    print(iam.list_attached_role_policies(RoleName=name))
    print(iam.list_role_policies(RoleName=name))
    print(s.template["Resources"]["EventsBridgeTaskRole"]["Properties"])
    name = s.role("GpuStageTaskRole")[0]
    print(iam.list_attached_role_policies(RoleName=name))
    assert 0
