//! What an SDK user meets that the other AWS tests do not look at, driven
//! by boto3 against the real daemon: the `x-amzn-requestid` header, a dry
//! run's 412, IOPS and throughput reported per volume type, each type's
//! size limits, AttachVolume's device names, DescribeVolumesModifications,
//! and the EBS direct APIs' answer for a snapshot in the wrong state.

use volumed_tests::aws::AwsEndpoint;

/// Helpers every script gets: `code(f)` is the error code `f` raises (or
/// "OK"), `err(f)` the whole error response.
const HELPERS: &str = r#"
import base64, hashlib, botocore.exceptions
def err(f):
    try:
        f()
    except botocore.exceptions.ClientError as e:
        return e.response
    raise AssertionError("no error from %r" % f)
def code(f):
    try:
        f()
        return "OK"
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"]
def rid_ok(md):
    h = md["HTTPHeaders"]
    assert h.get("x-amzn-requestid"), h
    assert h["x-amzn-requestid"] == md["RequestId"], md
"#;

#[test]
fn ec2_answers_as_sdks_expect() {
    let ep = AwsEndpoint::start();
    ep.python(&format!(
        r#"{HELPERS}
ec2 = boto3.client("ec2")
# Every answer names its request in the header SDKs read, and the same id
# as the XML body (which botocore reads for EC2).
rid_ok(ec2.describe_volumes()["ResponseMetadata"])
rid_ok(err(lambda: ec2.describe_volumes(VolumeIds=["vol-0123456789abcdef0"]))["ResponseMetadata"])

# A dry run that would succeed: DryRunOperation with HTTP 412, nothing made.
e = err(lambda: ec2.create_volume(Size=1, AvailabilityZone="us-east-1a", DryRun=True))
assert e["Error"]["Code"] == "DryRunOperation", e
assert e["ResponseMetadata"]["HTTPStatusCode"] == 412, e["ResponseMetadata"]
rid_ok(e["ResponseMetadata"])
assert ec2.describe_volumes()["Volumes"] == []

# IOPS and throughput are reported whether or not they were given.
def vol(**kw):
    return ec2.create_volume(AvailabilityZone="us-east-1a", **kw)
def perf(v):
    return (v.get("Iops"), v.get("Throughput"))
made = {{}}
made["gp3"] = vol(Size=8, VolumeType="gp3")
made["gp2-1"] = vol(Size=1)
made["gp2-100"] = vol(Size=100, VolumeType="gp2")
made["gp3-fast"] = vol(Size=8, VolumeType="gp3", Iops=6000, Throughput=250)
made["io2"] = vol(Size=4, VolumeType="io2", Iops=1000)
made["st1"] = vol(Size=125, VolumeType="st1")
made["standard"] = vol(Size=1, VolumeType="standard")
want = {{
    "gp3": (3000, 125), "gp2-1": (100, None), "gp2-100": (300, None),
    "gp3-fast": (6000, 250), "io2": (1000, None), "st1": (None, None), "standard": (None, None),
}}
for k, v in made.items():
    assert perf(v) == want[k], (k, v)
    d = ec2.describe_volumes(VolumeIds=[v["VolumeId"]])["Volumes"][0]
    assert perf(d) == want[k], (k, d)
count = len(ec2.describe_volumes()["Volumes"])

# Each type's sizes, and which of Iops and Throughput it takes.
bad = [
    (dict(Size=16385, VolumeType="gp2"), "InvalidParameterValue", "too large; maximum is 16384GB"),
    (dict(Size=65537, VolumeType="gp3"), "InvalidParameterValue", ""),
    (dict(Size=1, VolumeType="io1", Iops=100), "InvalidParameterValue", "too small; minimum is 4GB"),
    (dict(Size=3, VolumeType="io2", Iops=100), "InvalidParameterValue", "minimum is 4GB"),
    (dict(Size=16385, VolumeType="io1", Iops=100), "InvalidParameterValue", "maximum is 16384GB"),
    (dict(Size=124, VolumeType="st1"), "InvalidParameterValue", "minimum is 125GB"),
    (dict(Size=16385, VolumeType="sc1"), "InvalidParameterValue", "maximum is 16384GB"),
    (dict(Size=1025, VolumeType="standard"), "InvalidParameterValue", "maximum is 1024GB"),
    (dict(Size=8, VolumeType="io1"), "InvalidParameterCombination", "iops must be specified"),
    (dict(Size=8, VolumeType="gp2", Iops=300), "InvalidParameterCombination", "iops is not supported"),
    (dict(Size=8, VolumeType="gp2", Throughput=125), "InvalidParameterCombination", "gp3"),
    (dict(Size=8, VolumeType="gp3", Iops=2999), "InvalidParameterValue", "out of range"),
    (dict(Size=8, VolumeType="gp3", Throughput=2001), "InvalidParameterValue", "out of range"),
]
for kw, c, words in bad:
    e = err(lambda: vol(**kw))["Error"]
    assert (e["Code"], words in e["Message"]) == (c, True), (kw, e)
assert len(ec2.describe_volumes()["Volumes"]) == count
# The same limits hold for a type given in a block-device mapping.
root = {{"DeviceName": "/dev/sda1", "Ebs": {{"SnapshotId": "snap-0123456789abcdef0", "VolumeSize": 1, "VolumeType": "io1", "Iops": 100}}}}
e = err(lambda: ec2.register_image(Name="small-io1", RootDeviceName="/dev/sda1", BlockDeviceMappings=[root]))["Error"]
assert e["Code"] == "InvalidParameterValue" and "minimum is 4GB" in e["Message"], e
assert ec2.describe_images(Owners=["self"])["Images"] == []

# AttachVolume takes EC2's device names only.
gp2 = made["gp2-1"]["VolumeId"]
for dev in ["/dev/foo", "/dev/sdA", "/dev/sdf16", "/dev/nvme1n1", "sdf/../x"]:
    e = err(lambda: ec2.attach_volume(VolumeId=gp2, InstanceId="i-0123456789abcdef0", Device=dev))["Error"]
    assert e["Code"] == "InvalidParameterValue" and "not a valid EBS device name" in e["Message"], (dev, e)
assert ec2.describe_volumes(VolumeIds=[gp2])["Volumes"][0]["State"] == "available"
ec2.attach_volume(VolumeId=gp2, InstanceId="i-0123456789abcdef0", Device="xvdf")
ec2.get_waiter("volume_in_use").wait(VolumeIds=[gp2], WaiterConfig={{"Delay": 1}})
ec2.detach_volume(VolumeId=gp2)
ec2.get_waiter("volume_available").wait(VolumeIds=[gp2], WaiterConfig={{"Delay": 1}})

# DescribeVolumesModifications: none before a ModifyVolume, then the most
# recent one per volume, as tools that poll it after ModifyVolume expect.
e = err(lambda: ec2.describe_volumes_modifications(VolumeIds=[gp2]))["Error"]
assert e["Code"] == "InvalidVolumeModification.NotFound", e
assert ec2.describe_volumes_modifications()["VolumesModifications"] == []
m = ec2.modify_volume(VolumeId=gp2, Size=2)["VolumeModification"]
assert (m["OriginalSize"], m["TargetSize"], m["ModificationState"]) == (1, 2, "completed"), m
e = err(lambda: ec2.modify_volume(VolumeId=gp2, Size=16385))["Error"]
assert e["Code"] == "InvalidParameterValue", e
ec2.modify_volume(VolumeId=gp2, Size=40)
ms = ec2.describe_volumes_modifications(VolumeIds=[gp2])["VolumesModifications"]
assert len(ms) == 1, ms
m = ms[0]
got = (m["VolumeId"], m["OriginalSize"], m["TargetSize"], m["OriginalIops"], m["TargetIops"],
       m["OriginalVolumeType"], m["TargetVolumeType"], m["ModificationState"], m["Progress"])
assert got == (gp2, 2, 40, 100, 120, "gp2", "gp2", "completed", 100), m
assert m["StartTime"] <= m["EndTime"], m
assert ec2.describe_volumes(VolumeIds=[gp2])["Volumes"][0]["Size"] == 40
g3 = made["gp3"]["VolumeId"]
ec2.modify_volume(VolumeId=g3, Size=9)
p = ec2.get_paginator("describe_volumes_modifications")
seen = [m["VolumeId"] for page in p.paginate(PaginationConfig={{"PageSize": 1}}) for m in page["VolumesModifications"]]
assert sorted(seen) == sorted([gp2, g3]), seen
f = lambda n, v: ec2.describe_volumes_modifications(Filters=[{{"Name": n, "Values": [v]}}])["VolumesModifications"]
assert [m["VolumeId"] for m in f("target-size", "40")] == [gp2]
assert [m["VolumeId"] for m in f("target-volume-type", "gp3")] == [g3]
assert [m["TargetThroughput"] for m in f("volume-id", g3)] == [125]
assert f("modification-state", "modifying") == []
assert code(lambda: f("no-such-filter", "x")) == "InvalidParameterValue"
ec2.delete_volume(VolumeId=gp2)
assert [m["VolumeId"] for m in ec2.describe_volumes_modifications()["VolumesModifications"]] == [g3]
"#
    ));
}

#[test]
fn ebs_names_a_snapshot_in_the_wrong_state() {
    let ep = AwsEndpoint::start();
    ep.python(&format!(
        r#"{HELPERS}
ebs = boto3.client("ebs")
BS = 524288
def b64(d): return base64.b64encode(hashlib.sha256(d).digest()).decode()
def put(sid, i, data):
    return ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=i, BlockData=data, DataLength=len(data),
                                  Checksum=b64(data), ChecksumAlgorithm="SHA256")
s = ebs.start_snapshot(VolumeSize=1)
rid_ok(s["ResponseMetadata"])
sid = s["SnapshotId"]
rid_ok(put(sid, 3, b"\x5a" * BS)["ResponseMetadata"])

# Listing a pending snapshot: it exists, it is not completed yet.
e = err(lambda: ebs.list_snapshot_blocks(SnapshotId=sid))
assert e["Error"]["Code"] == "ValidationException", e
assert e["Reason"] == "INVALID_SNAPSHOT_ID" and "is pending" in e["Error"]["Message"], e
assert e["ResponseMetadata"]["HTTPStatusCode"] == 400
rid_ok(e["ResponseMetadata"])

rid_ok(ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=1)["ResponseMetadata"])
# Writing to or completing a completed one: it exists, it is not pending.
for f in (lambda: put(sid, 4, b"\x00" * BS), lambda: ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=1)):
    e = err(f)
    assert e["Error"]["Code"] == "ValidationException", e
    assert e["Reason"] == "INVALID_SNAPSHOT_ID" and "is completed" in e["Error"]["Message"], e
l = ebs.list_snapshot_blocks(SnapshotId=sid)
rid_ok(l["ResponseMetadata"])
assert [b["BlockIndex"] for b in l["Blocks"]] == [3], l

# A snapshot that does not exist still does not.
for f in (lambda: put("snap-00000000000000000", 0, b"\x00" * BS),
          lambda: ebs.list_snapshot_blocks(SnapshotId="snap-00000000000000000")):
    e = err(f)
    assert e["Error"]["Code"] == "ResourceNotFoundException" and e["Reason"] == "SNAPSHOT_NOT_FOUND", e
"#
    ));
}
