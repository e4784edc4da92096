"""The EC2 Query endpoint driven by the real AWS clients: boto3 and the aws
CLI, unchanged, against a live all-in-one (`ferro up`).

Run by cli/tests/ec2_clients.rs with the environment `ferro up` wrote to
<data>/ec2.env (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, FERRO_EC2_ENDPOINT) and FERRO_AWS_CLI (the aws
program). Prints one `ok <check>` line per check; any failure raises.
"""

import base64
import datetime
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock

import boto3
import botocore
import botocore.auth
from botocore.config import Config
from botocore.exceptions import ClientError

ENDPOINT = os.environ["FERRO_EC2_ENDPOINT"]
REGION = os.environ["AWS_DEFAULT_REGION"]
KEY = os.environ["AWS_ACCESS_KEY_ID"]
SECRET = os.environ["AWS_SECRET_ACCESS_KEY"]
AWS = os.environ["FERRO_AWS_CLI"]
ONCE = Config(retries={"max_attempts": 1, "mode": "standard"})


def client(secret=SECRET):
    return boto3.client(
        "ec2",
        endpoint_url=ENDPOINT,
        region_name=REGION,
        aws_access_key_id=KEY,
        aws_secret_access_key=secret,
        config=ONCE,
    )


def ok(name, detail=""):
    print(f"ok {name} {detail}".rstrip(), flush=True)


def expect_error(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except ClientError as e:
        got = e.response["Error"]["Code"]
        assert got == code, f"wanted {code}, got {got}: {e}"
        return e
    raise AssertionError(f"wanted {code}, the call succeeded")


def wait(what, pred, secs=120):
    end = time.time() + secs
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def main():
    ec2 = client()

    # The catalog.
    regions = ec2.describe_regions()["Regions"]
    assert [r["RegionName"] for r in regions] == [REGION], regions
    zones = ec2.describe_availability_zones()["AvailabilityZones"]
    assert zones and zones[0]["ZoneName"] == "az-1", zones
    types = ec2.describe_instance_types(InstanceTypes=["f1.nano"])["InstanceTypes"]
    assert types[0]["VCpuInfo"]["DefaultVCpus"] == 1, types
    image = wait(
        "the test image",
        lambda: [
            i
            for i in ec2.describe_images(Filters=[{"Name": "name", "Values": ["ferro-test-guest"]}])[
                "Images"
            ]
        ],
    )[0]["ImageId"]
    ok("catalog", f"image {image}")

    # Key pairs.
    kp = ec2.create_key_pair(KeyName="ec2-test")
    assert kp["KeyMaterial"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----"), kp
    expect_error("InvalidKeyPair.Duplicate", ec2.create_key_pair, KeyName="ec2-test")
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/k"], check=True
        )
        pub = open(f"{d}/k.pub", "rb").read()
    ec2.import_key_pair(KeyName="ec2-imported", PublicKeyMaterial=pub)
    names = sorted(k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"])
    assert "ec2-test" in names and "ec2-imported" in names, names
    ec2.delete_key_pair(KeyName="ec2-imported")
    expect_error("InvalidKeyPair.NotFound", ec2.describe_key_pairs, KeyNames=["ec2-imported"])
    ok("key pairs")

    # A VPC, a subnet and a security group with a rule.
    vpc = ec2.create_vpc(
        CidrBlock="10.77.0.0/16",
        TagSpecifications=[{"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": "ec2-test"}]}],
    )["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.77.1.0/24", AvailabilityZone="az-1")[
        "Subnet"
    ]["SubnetId"]
    got = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    assert [s["SubnetId"] for s in got] == [subnet], got
    sg = ec2.create_security_group(VpcId=vpc, GroupName="web", Description="web servers")["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=sg,
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}
        ],
    )
    g = ec2.describe_security_groups(GroupIds=[sg])["SecurityGroups"][0]
    perms = [(p["IpProtocol"], p.get("FromPort"), [r["CidrIp"] for r in p["IpRanges"]]) for p in g["IpPermissions"]]
    assert ("tcp", 22, ["10.0.0.0/8"]) in perms, perms
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:Name", "Values": ["ec2-test"]}])["Vpcs"]
    assert [v["VpcId"] for v in vpcs] == [vpc], vpcs
    expect_error("DependencyViolation", ec2.delete_vpc, VpcId=vpc)
    ok("vpc, subnet, security group", f"{vpc} {subnet} {sg}")

    # RunInstances with a client token, twice: one reservation.
    run = dict(
        ImageId=image,
        InstanceType="f1.nano",
        MinCount=1,
        MaxCount=1,
        KeyName="ec2-test",
        SubnetId=subnet,
        SecurityGroupIds=[sg],
        ClientToken="ec2-test-run-1",
        UserData="hello from boto3",
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "web-1"}, {"Key": "env", "Value": "ci"}]}
        ],
    )
    r1 = ec2.run_instances(**run)
    r2 = ec2.run_instances(**run)
    assert r1["ReservationId"] == r2["ReservationId"], (r1, r2)
    iid = r1["Instances"][0]["InstanceId"]
    assert r2["Instances"][0]["InstanceId"] == iid
    assert r1["Instances"][0]["State"] == {"Code": 0, "Name": "pending"}, r1["Instances"][0]["State"]
    changed = dict(run, InstanceType="f1.micro")
    expect_error("IdempotentParameterMismatch", ec2.run_instances, **changed)
    ok("run-instances with a client token twice", iid)

    ec2.get_waiter("instance_running").wait(InstanceIds=[iid], WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    ok("waiter instance_running")

    # Describe with filters.
    def ids(**kw):
        out = []
        for r in ec2.describe_instances(**kw)["Reservations"]:
            out += [i["InstanceId"] for i in r["Instances"]]
        return out

    for f in [
        {"Name": "tag:Name", "Values": ["web-1", "nope"]},
        {"Name": "tag-key", "Values": ["env"]},
        {"Name": "instance-state-name", "Values": ["running"]},
        {"Name": "instance-type", "Values": ["f1.nano"]},
        {"Name": "availability-zone", "Values": ["az-1"]},
        {"Name": "vpc-id", "Values": [vpc]},
        {"Name": "subnet-id", "Values": [subnet]},
    ]:
        assert iid in ids(Filters=[f]), f
    assert ids(Filters=[{"Name": "tag:Name", "Values": ["other"]}]) == []
    assert ids(Filters=[{"Name": "instance-type", "Values": ["f1.micro"]}, {"Name": "vpc-id", "Values": [vpc]}]) == []
    inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert inst["SubnetId"] == subnet and inst["VpcId"] == vpc, inst
    assert inst["PrivateIpAddress"].startswith("10.77.1."), inst
    assert inst["SecurityGroups"][0]["GroupId"] == sg, inst
    assert {"Key": "env", "Value": "ci"} in inst["Tags"], inst
    assert inst["KeyName"] == "ec2-test"
    assert ids(Filters=[{"Name": "private-ip-address", "Values": [inst["PrivateIpAddress"]]}]) == [iid]
    ec2.create_tags(Resources=[iid], Tags=[{"Key": "team", "Value": "blue"}])
    assert iid in ids(Filters=[{"Name": "tag:team", "Values": ["blue"]}])
    described = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [iid]}])["Tags"]
    assert {"ResourceId": iid, "ResourceType": "instance", "Key": "team", "Value": "blue"} in described, described
    ec2.delete_tags(Resources=[iid], Tags=[{"Key": "team"}])
    assert ids(Filters=[{"Name": "tag:team", "Values": ["blue"]}]) == []
    ok("describe with filters and tags")

    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceType")
    assert attr["InstanceType"]["Value"] == "f1.nano", attr
    ec2.modify_instance_attribute(InstanceId=iid, InstanceInitiatedShutdownBehavior={"Value": "terminate"})
    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate", attr
    ec2.create_placement_group(GroupName="ec2-spread", Strategy="spread")
    pg = ec2.describe_placement_groups(GroupNames=["ec2-spread"])["PlacementGroups"]
    assert pg[0]["Strategy"] == "spread", pg
    ec2.delete_placement_group(GroupName="ec2-spread")
    expect_error("InvalidPlacementGroup.Unknown", ec2.describe_placement_groups, GroupNames=["ec2-spread"])
    ok("instance attributes, placement groups")

    # A stopped instance's type and user data (EC2 changes them only while
    # the instance is stopped); the next start runs the guest with them.
    expect_error(
        "IncorrectInstanceState", ec2.modify_instance_attribute, InstanceId=iid, InstanceType={"Value": "f1.micro"}
    )
    expect_error(
        "IncorrectInstanceState", ec2.modify_instance_attribute, InstanceId=iid, UserData={"Value": b"too soon"}
    )
    boots = wait("the first boot", lambda: ec2.get_console_output(InstanceId=iid).get("Output", "").count("selftest done"))
    ec2.stop_instances(InstanceIds=[iid])
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[iid], WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    expect_error(
        "InvalidInstanceAttributeValue", ec2.modify_instance_attribute, InstanceId=iid, InstanceType={"Value": "f9.huge"}
    )
    ec2.modify_instance_attribute(InstanceId=iid, InstanceType={"Value": "f1.micro"})
    ec2.modify_instance_attribute(InstanceId=iid, UserData={"Value": b"#!/bin/sh\necho resized\n"})
    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceType")
    assert attr["InstanceType"]["Value"] == "f1.micro", attr
    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
    assert base64.b64decode(attr["UserData"]["Value"]) == b"#!/bin/sh\necho resized\n", attr
    # The aws CLI's Attribute/Value form (user data given base64-encoded).
    subprocess.run(
        [AWS, "ec2", "modify-instance-attribute", "--endpoint-url", ENDPOINT, "--instance-id", iid,
         "--attribute", "userData", "--value", base64.b64encode(b"from the aws cli").decode()],
        check=True,
    )
    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
    assert base64.b64decode(attr["UserData"]["Value"]) == b"from the aws cli", attr
    inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert inst["InstanceType"] == "f1.micro", inst
    ec2.start_instances(InstanceIds=[iid])
    ec2.get_waiter("instance_running").wait(InstanceIds=[iid], WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    expect_error(
        "IncorrectInstanceState", ec2.modify_instance_attribute, InstanceId=iid, InstanceType={"Value": "f1.nano"}
    )

    # The guest of the second boot saw f1.micro's 256 MiB (f1.nano: 128).
    def second_boot():
        out = ec2.get_console_output(InstanceId=iid).get("Output", "")
        return out.count("selftest done") > boots and out

    out = wait("the guest's second boot on the console", second_boot)
    last = out[out.rindex("ferro-guest: e820"):]
    ram = int(last.split("ram_mib=")[1].split()[0])
    assert 200 < ram <= 256, f"the resized guest saw {ram} MiB:\n{last[:400]}"
    cpus = int(out[out.rindex("ferro-guest: acpi cpus="):].split("cpus=")[1].split()[0])
    assert cpus == 1, cpus
    ok("modify instance type and user data while stopped", f"guest ram_mib={ram}")

    status = ec2.describe_instance_status(InstanceIds=[iid])["InstanceStatuses"]
    assert status[0]["InstanceState"]["Name"] == "running", status
    nic = ec2.describe_network_interfaces(Filters=[{"Name": "attachment.instance-id", "Values": [iid]}])
    assert nic["NetworkInterfaces"][0]["SubnetId"] == subnet, nic

    # Console output (botocore decodes EC2's base64).
    def console():
        out = ec2.get_console_output(InstanceId=iid).get("Output", "")
        return "selftest done" in out and out

    out = wait("the guest's self-test on the console", console)
    ok("console output", f"{len(out)} bytes")

    # A volume (the all-in-one's type `single`: one host, one replica).
    assert ec2.describe_volumes()["Volumes"] == []
    expect_error("InvalidParameterValue", ec2.create_volume, Size=0, AvailabilityZone="az-1")
    expect_error("InvalidParameterValue", ec2.create_volume, Size=1, AvailabilityZone="az-1", VolumeType="gp9")
    v = ec2.create_volume(
        Size=1,
        AvailabilityZone="az-1",
        TagSpecifications=[{"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": "data"}]}],
    )
    vol = v["VolumeId"]
    assert v["Size"] == 1 and v["VolumeType"] == "single" and v["State"] == "creating", v
    ec2.get_waiter("volume_available").wait(VolumeIds=[vol], WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    # Attached while the instance runs: refused (no hot-attach).
    expect_error("IncorrectInstanceState", ec2.attach_volume, VolumeId=vol, InstanceId=iid, Device="/dev/vdb")
    ok("volume create, describe", vol)

    # Stop, start, terminate: EC2's state codes; the volume is attached
    # while stopped and reaches the guest at its start.
    s = ec2.stop_instances(InstanceIds=[iid])["StoppingInstances"][0]
    assert s["PreviousState"] == {"Code": 16, "Name": "running"}, s
    assert s["CurrentState"]["Code"] in (64, 80), s
    ec2.get_waiter("instance_stopped").wait(InstanceIds=[iid], WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    a = ec2.attach_volume(VolumeId=vol, InstanceId=iid, Device="/dev/vdb")
    assert a["VolumeId"] == vol and a["InstanceId"] == iid and a["Device"] == "/dev/vdb", a
    v = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [iid]}])["Volumes"]
    assert [x["VolumeId"] for x in v] == [vol] and v[0]["State"] == "in-use", v
    assert v[0]["Attachments"][0]["Device"] == "/dev/vdb", v
    assert v[0]["Attachments"][0]["DeleteOnTermination"] is False, v
    assert {"Key": "Name", "Value": "data"} in v[0]["Tags"], v
    s = ec2.start_instances(InstanceIds=[iid])["StartingInstances"][0]
    assert s["PreviousState"] == {"Code": 80, "Name": "stopped"}, s
    assert s["CurrentState"] == {"Code": 0, "Name": "pending"}, s
    ec2.get_waiter("instance_running").wait(InstanceIds=[iid], WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    seen = f"virtio-blk serial={vol} sectors=2097152"
    wait(
        "the volume on the guest's console",
        lambda: seen in ec2.get_console_output(InstanceId=iid).get("Output", ""),
    )
    inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    mapped = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", [])}
    assert mapped.get("/dev/vdb") == vol, inst.get("BlockDeviceMappings")
    ok("volume attach: the guest sees it", seen)
    ec2.reboot_instances(InstanceIds=[iid])
    s = ec2.terminate_instances(InstanceIds=[iid])["TerminatingInstances"][0]
    assert s["CurrentState"] == {"Code": 32, "Name": "shutting-down"}, s
    ec2.get_waiter("instance_terminated").wait(InstanceIds=[iid], WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    ok("stop/start/reboot/terminate with state codes")

    # Terminating left the volume (DeleteOnTermination false): available
    # again, then deleted.
    ec2.get_waiter("volume_available").wait(VolumeIds=[vol], WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    ec2.delete_volume(VolumeId=vol)
    ec2.get_waiter("volume_deleted").wait(VolumeIds=[vol], WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    expect_error("InvalidVolume.NotFound", ec2.delete_volume, VolumeId=vol)
    ok("volume detached by terminate, deleted")

    # Paging through 250 instances (terminated at once: they stay listed).
    paged = []
    for n in (100, 100, 50):
        r = ec2.run_instances(
            ImageId=image,
            InstanceType="f1.nano",
            MinCount=n,
            MaxCount=n,
            TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "batch", "Value": "paging"}]}],
        )
        batch = [i["InstanceId"] for i in r["Instances"]]
        ec2.terminate_instances(InstanceIds=batch)
        # Those the host started meanwhile free their room once deleted.
        ec2.get_waiter("instance_terminated").wait(
            InstanceIds=batch, WaiterConfig={"Delay": 1, "MaxAttempts": 120}
        )
        paged += batch
    seen, pages = [], 0
    for page in ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag:batch", "Values": ["paging"]}], PaginationConfig={"PageSize": 40}
    ):
        pages += 1
        for r in page["Reservations"]:
            seen += [i["InstanceId"] for i in r["Instances"]]
    assert sorted(seen) == sorted(paged) and len(seen) == 250, (len(seen), len(set(seen)))
    assert pages == 7, pages
    expect_error("InvalidParameterValue", ec2.describe_instances, MaxResults=2000)
    ok("paging", f"250 instances in {pages} pages of 40")

    # Errors, as the clients raise them.
    expect_error("InvalidInstanceID.NotFound", ec2.describe_instances, InstanceIds=["i-00000000deadbeef"])
    expect_error("InvalidInstanceID.Malformed", ec2.stop_instances, InstanceIds=["bogus"])
    expect_error("InvalidParameterValue", ec2.run_instances, ImageId=image, MinCount=2, MaxCount=1)
    expect_error("InvalidAMIID.NotFound", ec2.run_instances, ImageId="img-0000000000000000", MinCount=1, MaxCount=1)
    expect_error("MissingParameter", ec2.create_security_group, GroupName="x", Description="y")
    expect_error("SignatureDoesNotMatch", client("0" * 40).describe_instances)
    expect_error("InvalidAction", ec2.describe_spot_price_history)
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=20)
    with mock.patch.object(botocore.auth, "get_current_datetime", lambda *a, **k: old.replace(tzinfo=None)):
        e = expect_error("RequestExpired", client().describe_instances)
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400, e.response
    ok("errors")

    # The aws CLI, as a user runs it.
    env = dict(os.environ)
    table = subprocess.run(
        [AWS, "ec2", "describe-instances", "--endpoint-url", ENDPOINT, "--output", "table",
         "--filters", "Name=tag:Name,Values=web-1"],
        env=env, check=True, capture_output=True, text=True,
    ).stdout
    assert "DescribeInstances" in table and iid in table, table
    new = subprocess.run(
        [AWS, "ec2", "run-instances", "--endpoint-url", ENDPOINT, "--image-id", image,
         "--instance-type", "f1.nano", "--count", "1", "--query", "Instances[0].InstanceId",
         "--output", "text"],
        env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()
    assert new.startswith("i-"), new
    subprocess.run(
        [AWS, "ec2", "terminate-instances", "--endpoint-url", ENDPOINT, "--instance-ids", new],
        env=env, check=True, capture_output=True,
    )
    ok("aws cli", f"describe-instances --output table, run-instances --query -> {new}")

    # Clean up what is not an instance.
    ec2.delete_security_group(GroupId=sg)
    ec2.delete_key_pair(KeyName="ec2-test")
    print("all checks passed", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report and fail
        import traceback

        traceback.print_exc()
        print(f"FAILED: {e}", flush=True)
        sys.exit(1)
