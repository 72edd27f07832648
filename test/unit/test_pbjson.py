# The proto3 JSON transcoder (agent/pbjson.c), through build/test/pbjson-tool, against Python's
# google.protobuf.json_format (python3-protobuf 3.21) on the same messages:
#
#   (a) the tool's JSON for a message's bytes equals MessageToJson's (compared after json.loads);
#   (b) the tool's bytes for MessageToJson's text (and for the variant with proto field names)
#       parse into a message equal to the original;
#   (c) what json_format refuses, the tool refuses too;
#   (d) where the tool is deliberately stricter than json_format (pbjson.h lists it), both
#       behaviours are pinned down here.
#
# Messages: hand-written ones of the Node API and of test/unit/pbjson_kinds.proto (every field
# kind), and generated ones: for every message type the Node service reaches (plus the kinds
# and proto2's FileDescriptorSet), messages with every field set and random ones.
#
# Run by `make check-pbjson`, which sets EMBER_BUILD (build/ or build/sanitize/).

import concurrent.futures
import json
import math
import os
import random
import struct
import subprocess
import sys

import pytest

SRCDIR = os.environ.get("EMBER_SRCDIR",
                        os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BUILD = os.environ.get("EMBER_BUILD", os.path.join(SRCDIR, "build"))
sys.path.insert(0, os.path.join(BUILD, "py"))
sys.path.insert(0, os.path.join(BUILD, "test", "pbjson", "py"))

from google.protobuf import descriptor, descriptor_pb2, json_format  # noqa: E402
from google.protobuf import duration_pb2, empty_pb2, field_mask_pb2, timestamp_pb2  # noqa: E402
from ember.v1 import node_pb2 as pb  # noqa: E402
import pbjson_kinds_pb2 as kp  # noqa: E402

TOOL = os.path.join(BUILD, "test", "pbjson-tool")
FD = descriptor.FieldDescriptor

# A sanitizer's report must not pass for the tool refusing an input (exit status 1): its exit
# status is made distinct, and its report goes to stderr, where the assertion shows it.
SANITIZER_EXIT = 97


def _tool_env():
    env = dict(os.environ)
    for var in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS"):
        opts = [o for o in env.get(var, "").split(":")
                if o and not o.startswith(("log_path=", "exitcode="))]
        opts.append("exitcode=%d" % SANITIZER_EXIT)
        env[var] = ":".join(opts)
    return env


TOOL_ENV = _tool_env()


def run_tool(mode, type_name, data):
    p = subprocess.run([TOOL, mode, type_name], input=data, capture_output=True, env=TOOL_ENV,
                       timeout=120)
    err = p.stderr.decode(errors="replace")
    assert p.returncode in (0, 1), f"pbjson-tool {mode} {type_name} exited {p.returncode}:\n{err}"
    assert "Sanitizer" not in err and "runtime error" not in err, err
    if p.returncode == 1:
        assert err.startswith("pbjson-tool: ") and len(err) > 14, "a refusal must say why"
    return p


def type_name(msg_or_cls):
    return msg_or_cls.DESCRIPTOR.full_name


def py_json(msg, names=False):
    return json_format.MessageToJson(msg, preserving_proto_field_name=names)


def tool_to_json(msg):
    p = run_tool("to-json", type_name(msg), msg.SerializeToString())
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return json.loads(p.stdout)


def tool_from_json(cls, text):
    """The message the tool makes of text, read back by Python; None if the tool refused."""
    data = text.encode() if isinstance(text, str) else text
    p = run_tool("from-json", type_name(cls), data)
    if p.returncode != 0:
        return None
    m = cls()
    m.ParseFromString(p.stdout)
    return m


def python_from_json(cls, text):
    try:
        return json_format.Parse(text, cls())
    except Exception:  # ParseError, and OverflowError or TypeError that json_format lets out
        return None


def has_nan(msg):
    for field, value in msg.ListFields():
        values = value if field.label == FD.LABEL_REPEATED else [value]
        if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            values = value.values()
            if field.message_type.fields_by_name["value"].type != FD.TYPE_MESSAGE:
                if any(isinstance(v, float) and math.isnan(v) for v in values):
                    return True
                continue
        for v in values:
            if isinstance(v, float) and math.isnan(v):
                return True
            if hasattr(v, "ListFields") and has_nan(v):
                return True
    return False


def same(a, b):
    if a == b:
        return True
    # NaN is not equal to itself: then what json_format says of both must be the same.
    return has_nan(a) and py_json(a) == py_json(b)


def check_to_json(msg):
    assert tool_to_json(msg) == json.loads(py_json(msg))


def check_from_json(msg):
    for names in (False, True):
        back = tool_from_json(type(msg), py_json(msg, names))
        assert back is not None, py_json(msg, names)
        assert same(back, msg), (py_json(msg, names), py_json(back))


def check_both(msg):
    check_to_json(msg)
    check_from_json(msg)


# ------------------------------------------------------------------------------------------
# hand-written messages


def ts(seconds, nanos=0):
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def dur(seconds, nanos=0):
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


TRICKY = "quote\" back\\ slash/ nl\n tab\t cr\r nul-less \x01\x1f\x7f é ✓ 😀 \u2028\u2029"
ALL_BYTES = bytes(range(256))


def sandbox(i):
    return pb.Sandbox(
        id=f"sb-{i}",
        spec=pb.SandboxSpec(template_id="base", vcpu_count=2, memory_mib=512,
                            disk_size_mib=2**40, labels={"team": "a", "é": "✓"},
                            env={"PATH": "/bin", "EMPTY": ""},
                            network=pb.NetworkPolicy(allow_internet=True,
                                                     allow_cidrs=["10.0.0.0/8"]),
                            end_time=ts(1700000000, 123456000),
                            on_expiry=pb.EXPIRY_ACTION_PAUSE, huge_pages=True),
        state=pb.SANDBOX_STATE_RUNNING, state_reason="", sandbox_ip="172.16.0.3",
        revision=2**63 + i, create_time=ts(-1, 999999999), update_time=ts(0),
        disk_used_bytes=4096, firecracker_version="1.7.0", template_id="base",
        saved_state_used_bytes=0,
        last_operation=pb.OperationTiming(
            op="create", steps=[pb.StepTiming(name="slot", duration_us=12),
                                pb.StepTiming(name="disk")],
            total_us=2**53 + 1, failed_step="", end_time=ts(1, 1000)))


def template(state=pb.TEMPLATE_STATE_READY):
    return pb.Template(
        id="base", state=state, state_reason="pull failed: 404" if state == 3 else "",
        kernel=pb.TemplateFile(path="/var/lib/ember/k", size_bytes=10, sha256="ab" * 32,
                               source="https://example.com/k?x=1&y=2"),
        rootfs=pb.TemplateFile(path="/r"), initrd=pb.TemplateFile(),
        boot_args="console=ttyS0 reboot=k", rootfs_disk_used_bytes=2**64 - 1,
        labels={"": "empty key", "k": ""}, create_time=ts(253402300799, 999999999),
        sandbox_count=3, snapshot_count=0,
        boot_snapshot=pb.TemplateBootSnapshot(vcpu_count=1, memory_mib=128,
                                              firecracker_version="1.7.0",
                                              disk_used_bytes=1))


NODE_MESSAGES = {
    "get-node-request": pb.GetNodeRequest(),
    "node-info": pb.NodeInfo(
        node_id="n1", hostname="nöde-✓", agent_version="0.1.0", kernel_release="6.1.0-18",
        cpu_count=64, memory_total_bytes=2**64 - 1, memory_available_bytes=2**53 + 1,
        state_dir="/var/lib/ember", disk_total_bytes=1, disk_free_bytes=0,
        capabilities=pb.NodeCapabilities(
            kvm=pb.Probe(available=False, reason=TRICKY),
            device_mapper=pb.Probe(available=True, version="4.47.0"),
            userfaultfd=pb.Probe(), firecracker=pb.Probe(available=True)),
        serving_state=pb.SERVING_STATE_SERVING, start_time=ts(1700000000, 123456789),
        boot_time=ts(1600000000), sandbox_count=0, vmm="fcsim", simulated=True,
        storage_backend="file", huge_pages_total_bytes=2**31, huge_pages_free_bytes=0),
    "node-info-unknown-enum": pb.NodeInfo(serving_state=42),
    "register-template": pb.RegisterTemplateRequest(
        template_id="t", kernel_path="/k", rootfs_path="/r", boot_args="a=b",
        labels={"a": "1", "b/c.d-e_f": "2", "ключ": "значение"},
        boot_snapshot=pb.TemplateSnapshotSpec(vcpu_count=2, memory_mib=256)),
    "template-ready": template(),
    "template-failed": template(pb.TEMPLATE_STATE_FAILED),
    "pull-template": pb.PullTemplateRequest(
        template_id="t", kernel=pb.RemoteArtifact(url="http://x/k", sha256="0" * 64,
                                                  size_bytes=2**40),
        rootfs=pb.RemoteArtifact(), labels={"x": "y"}),
    "pull-progress-done": pb.PullTemplateProgress(
        phase=pb.PULL_PHASE_DONE, kernel=pb.ArtifactProgress(bytes_done=5, bytes_total=5),
        rootfs=pb.ArtifactProgress(), template=template()),
    "list-templates": pb.ListTemplatesResponse(templates=[template(), pb.Template(),
                                                          template(2)]),
    "create-sandbox": pb.CreateSandboxRequest(sandbox_id="sb-1", spec=sandbox(1).spec),
    "create-sandbox-snapshot-empty": pb.CreateSandboxRequest(
        sandbox_id="x", spec=pb.SandboxSpec(snapshot_id="", network=pb.NetworkPolicy())),
    "sandbox": sandbox(7),
    "list-sandboxes-request": pb.ListSandboxesRequest(
        state=pb.SANDBOX_STATE_PAUSED, label_selector={"a": "b", "c": ""}),
    "list-sandboxes": pb.ListSandboxesResponse(sandboxes=[sandbox(1), sandbox(2)],
                                               revision=2**64 - 1),
    "update-sandbox": pb.UpdateSandboxRequest(
        sandbox_id="sb", spec=pb.SandboxSpec(labels={"a": "b"}),
        update_mask=field_mask_pb2.FieldMask(paths=["end_time", "on_expiry", "labels",
                                                    "network"])),
    "update-sandbox-empty-mask": pb.UpdateSandboxRequest(
        sandbox_id="sb", update_mask=field_mask_pb2.FieldMask()),
    "destroy-found": pb.DestroySandboxResponse(found=True),
    "destroy-not-found": pb.DestroySandboxResponse(found=False),
    "watch-request": pb.WatchSandboxesRequest(since_revision=2**64 - 1),
    "event-changed": pb.SandboxEvent(revision=9, time=ts(1700000000, 1000000),
                                     changed=sandbox(3)),
    "event-removed": pb.SandboxEvent(revision=10, removed=pb.SandboxRemoved(sandbox_id="sb")),
    "event-resync-empty": pb.SandboxEvent(resync=pb.SandboxResync()),
    "exec-start": pb.ExecRequest(start=pb.ExecStart(
        sandbox_id="sb", argv=["/bin/sh", "-c", "echo 'ü' \"$X\"", ""],
        env={"X": "1", "LANG": "C.UTF-8"}, cwd="/tmp", uid=1000, gid=2**32 - 1, tty=True,
        rows=24, cols=80, stdin=True, timeout=dur(1, 500000000))),
    "exec-start-timeouts": pb.ExecRequest(start=pb.ExecStart(timeout=dur(0, -1000))),
    "exec-start-zero-timeout": pb.ExecRequest(start=pb.ExecStart(timeout=dur(0))),
    "exec-stdin-binary": pb.ExecRequest(stdin_data=b"\x00\xff\xfe\x80abc\xc3\x28"),
    "exec-stdin-empty": pb.ExecRequest(stdin_data=b""),
    "exec-close-stdin": pb.ExecRequest(close_stdin=pb.ExecCloseStdin()),
    "exec-resize": pb.ExecRequest(resize=pb.ExecResize(rows=65535, cols=1)),
    "exec-signal-negative": pb.ExecRequest(signal=pb.ExecSignal(signal=-2**31)),
    "exec-started": pb.ExecResponse(started=pb.ExecStarted(pid=1)),
    "exec-stdout-1": pb.ExecResponse(stdout_data=b"a"),
    "exec-stdout-2": pb.ExecResponse(stdout_data=b"ab"),
    "exec-stderr-3": pb.ExecResponse(stderr_data=b"\xfb\xff\xbf"),
    "exec-exit": pb.ExecResponse(exit=pb.ExecExit(exit_code=-1, signal=9, timed_out=True,
                                                  core_dumped=True)),
    "exec-exit-zero": pb.ExecResponse(exit=pb.ExecExit()),
    "write-header-size-zero": pb.WriteFileRequest(header=pb.WriteFileHeader(
        sandbox_id="sb", path="/etc/x", mode=0o7777, uid=0, gid=1, size=0)),
    "write-header-no-size": pb.WriteFileRequest(header=pb.WriteFileHeader(path="/x")),
    "write-data-large": pb.WriteFileRequest(data=bytes(random.Random(1).randrange(256)
                                                       for _ in range(100000))),
    "write-response": pb.WriteFileResponse(size=2**64 - 1),
    "read-file-info": pb.ReadFileResponse(info=pb.FileInfo(size=3, mode=0o644)),
    "read-file-data": pb.ReadFileResponse(data=ALL_BYTES),
    "read-console": pb.ReadConsoleResponse(data=b"\x1b[0m\r\n\xff", offset=2**40,
                                           skipped_bytes=1),
    "snapshot": pb.Snapshot(id="s", source_sandbox_id="sb", template_id="t", vcpu_count=1,
                            memory_mib=128, disk_used_bytes=1, firecracker_version="1",
                            create_time=ts(-62135596800), labels={"a": "b"},
                            dependent_sandbox_count=2, huge_pages=True),
    "create-snapshot": pb.CreateSnapshotRequest(snapshot_id="s", sandbox_id="sb",
                                                labels={"x": TRICKY}),
    "list-snapshots-request": pb.ListSnapshotsRequest(template_id="t",
                                                      label_selector={"a": "b"}),
    "list-snapshots": pb.ListSnapshotsResponse(snapshots=[pb.Snapshot(id="a"),
                                                          pb.Snapshot()]),
    "delete-snapshot-response": pb.DeleteSnapshotResponse(),
}


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def scalars(**kw):
    return kp.Scalars(**kw)


KINDS_MESSAGES = {
    "scalars-max": scalars(
        f_double=1.7976931348623157e308, f_float=f32(3.4028234663852886e38), f_int32=2**31 - 1,
        f_int64=2**63 - 1, f_uint32=2**32 - 1, f_uint64=2**64 - 1, f_sint32=2**31 - 1,
        f_sint64=2**63 - 1, f_fixed32=2**32 - 1, f_fixed64=2**64 - 1, f_sfixed32=2**31 - 1,
        f_sfixed64=2**63 - 1, f_bool=True, f_string=TRICKY, f_bytes=ALL_BYTES,
        f_enum=kp.COLOR_GREEN),
    "scalars-min": scalars(
        f_double=-1.7976931348623157e308, f_float=f32(-3.4028234663852886e38),
        f_int32=-2**31, f_int64=-2**63, f_uint32=1, f_uint64=1, f_sint32=-2**31,
        f_sint64=-2**63, f_fixed32=1, f_fixed64=1, f_sfixed32=-2**31, f_sfixed64=-2**63,
        f_string="a", f_bytes=b"\x00", f_enum=kp.COLOR_INFRARED),
    "scalars-fractions": scalars(
        f_double=0.1, f_float=f32(0.1), f_int64=2**53 + 1, f_uint64=2**53 + 1,
        f_sint64=-(2**53 + 1)),
    "scalars-tiny": scalars(f_double=5e-324, f_float=f32(1e-45)),
    "scalars-floats-1": scalars(f_double=1e21, f_float=f32(16777217.0)),
    "scalars-floats-2": scalars(f_double=123456789.0, f_float=f32(1 / 3)),
    "scalars-floats-3": scalars(f_double=1e-7, f_float=f32(2.5e-38)),
    "scalars-floats-4": scalars(f_double=0.30000000000000004, f_float=f32(0.3)),
    "scalars-infinities": scalars(f_double=math.inf, f_float=-math.inf),
    "scalars-nan": scalars(f_double=math.nan, f_float=math.nan),
    "scalars-unknown-enum": scalars(f_enum=12345),
    "scalars-negative-unknown-enum": scalars(f_enum=-7),
    "repeated-all": kp.Repeated(
        r_double=[0.0, -1.5, math.inf, 5e-324], r_float=[f32(0.1), 0.0, -math.inf],
        r_int32=[0, -1, 2**31 - 1], r_int64=[0, -2**63, 2**63 - 1], r_uint32=[0, 2**32 - 1],
        r_uint64=[0, 2**64 - 1], r_sint32=[-2**31, 0], r_sint64=[-2**63, 0],
        r_fixed32=[0, 1], r_fixed64=[2**64 - 1], r_sfixed32=[-1], r_sfixed64=[-2**63],
        r_bool=[True, False, True], r_string=["", "a", TRICKY], r_bytes=[b"", b"\xff", b"ab"],
        r_enum=[0, 1, 2, -1, 99], r_message=[scalars(), scalars(f_int32=1)],
        r_unpacked=[0, -1, 7],
        r_timestamp=[ts(0), ts(1, 1000000), ts(1, 1000), ts(1, 1), ts(-1)],
        r_duration=[dur(0), dur(-1, -500000000), dur(1, 1000), dur(0, 1)],
        r_field_mask=[field_mask_pb2.FieldMask(), field_mask_pb2.FieldMask(paths=["a.b_c"])],
        r_empty=[empty_pb2.Empty()] * 2),
    "repeated-zeros": kp.Repeated(r_int32=[0], r_string=[""], r_bytes=[b""], r_bool=[False],
                                  r_double=[-0.0]),
    "repeated-nan": kp.Repeated(r_double=[math.nan], r_float=[math.nan]),
    "maps-keys": kp.Maps(
        string_string={"": "", "a": "b", TRICKY: TRICKY},
        int32_string={-2**31: "min", 0: "zero", 2**31 - 1: "max"},
        int64_string={-2**63: "min", 2**63 - 1: "max"},
        uint32_string={0: "a", 2**32 - 1: "b"}, uint64_string={2**64 - 1: "max"},
        sint32_string={-1: "x"}, sint64_string={-2**63: "x"},
        fixed32_string={7: "x"}, fixed64_string={2**64 - 1: "x"},
        sfixed32_string={-2**31: "x"}, sfixed64_string={2**63 - 1: "x"},
        bool_string={True: "t", False: "f"}),
    "maps-values": kp.Maps(
        string_bytes={"a": b"\xff\x00", "b": b""}, string_double={"a": -0.5, "inf": math.inf},
        string_float={"a": f32(0.1)}, string_int64={"a": -2**63},
        string_uint64={"a": 2**64 - 1}, string_bool={"t": True, "f": False},
        string_enum={"a": kp.COLOR_RED, "u": 77, "z": 0},
        string_timestamp={"epoch": ts(0), "ms": ts(1, 5000000)},
        string_duration={"neg": dur(-3, -100)}),
    "maps-messages": kp.Maps(string_message={"empty": scalars(), "full": scalars(f_int32=5)},
                             int32_maps={1: kp.Maps(int32_string={2: "two"}), 3: kp.Maps()}),
    "oneofs-plain": kp.Oneofs(plain=5),
    "oneofs-second-zero": kp.Oneofs(s_number=0, o_string=""),
    "wkt-range": kp.Wkt(timestamp=ts(-62135596800), duration=dur(315576000000, 999999999),
                        field_mask=field_mask_pb2.FieldMask(paths=["a", "foo_bar.baz_qux",
                                                                   "x1.y2"]),
                        empty=empty_pb2.Empty()),
    "wkt-range-2": kp.Wkt(timestamp=ts(253402300799, 999999999),
                          duration=dur(-315576000000, -999999999)),
    "wkt-digits": kp.Repeated(r_timestamp=[ts(1, 100000000), ts(1, 120000), ts(1, 123456780),
                                           ts(1, 999999999), ts(-86400 * 365 * 1000)],
                              r_duration=[dur(0, -1), dur(-1), dur(0, 100000000),
                                          dur(5, 120000), dur(7, 123456780)]),
    "names": kp.Names(snake_case_name=1, camelCase=2, with_digit_1=3, a_b_c=4, UPPER=5,
                      mixed_Case=6, trailing_=7, x2y=8, _leading=9),
    "nested": kp.Nested(label="top", scalars=scalars(f_int32=1),
                        child=kp.Nested(child=kp.Nested(label="deep")),
                        children=[kp.Nested(), kp.Nested(children=[kp.Nested(label="x")])]),
    "kinds-empty": kp.Kinds(),
    "kinds-empty-parts": kp.Kinds(scalars=scalars(), repeated=kp.Repeated(), maps=kp.Maps(),
                                  oneofs=kp.Oneofs(), wkt=kp.Wkt(), names=kp.Names(),
                                  nested=kp.Nested()),
}


def _oneof_branches():
    """Each member of Oneofs.kind, set to its zero value: set oneof members are sent anyway."""
    out = {}
    for f in kp.Oneofs.DESCRIPTOR.oneofs_by_name["kind"].fields:
        m = kp.Oneofs()
        if f.type == FD.TYPE_MESSAGE:
            getattr(m, f.name).SetInParent()
        else:
            setattr(m, f.name, f.default_value)
        out["oneof-zero-" + f.name] = m
    # and a value that is not zero, for the scalar ones
    nonzero = {"o_double": -2.5, "o_float": f32(0.1), "o_int32": -1, "o_int64": -2**63,
               "o_uint32": 2**32 - 1, "o_uint64": 2**64 - 1, "o_sint32": -5, "o_sint64": -5,
               "o_fixed32": 5, "o_fixed64": 5, "o_sfixed32": -5, "o_sfixed64": -5,
               "o_bool": True, "o_string": "x", "o_bytes": b"\xff", "o_enum": 99}
    for name, value in nonzero.items():
        out["oneof-" + name] = kp.Oneofs(**{name: value})
    out["oneof-o_timestamp"] = kp.Oneofs(o_timestamp=ts(5, 5))
    out["oneof-o_duration"] = kp.Oneofs(o_duration=dur(-5, -5))
    out["oneof-o_field_mask"] = kp.Oneofs(
        o_field_mask=field_mask_pb2.FieldMask(paths=["a_b", "c"]))
    out["oneof-o_message"] = kp.Oneofs(o_message=scalars(f_bool=True), s_name="n")
    return out


def _proto2_messages():
    """descriptor.proto is proto2: has_ flags and defaults, required fields."""
    fds = descriptor_pb2.FileDescriptorSet()
    for mod in (pb, kp, timestamp_pb2):
        f = fds.file.add()
        mod.DESCRIPTOR.CopyToProto(f)
    explicit = descriptor_pb2.FileDescriptorSet(file=[descriptor_pb2.FileDescriptorProto(
        name="", package="",
        options=descriptor_pb2.FileOptions(java_multiple_files=False,
                                           optimize_for=descriptor_pb2.FileOptions.SPEED,
                                           cc_enable_arenas=True),
        message_type=[descriptor_pb2.DescriptorProto(field=[
            descriptor_pb2.FieldDescriptorProto(
                name="x", number=0, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                options=descriptor_pb2.FieldOptions(
                    ctype=descriptor_pb2.FieldOptions.STRING, packed=False,
                    uninterpreted_option=[descriptor_pb2.UninterpretedOption(
                        name=[descriptor_pb2.UninterpretedOption.NamePart(
                            name_part="", is_extension=False)],
                        positive_int_value=0, negative_int_value=-2**63,
                        double_value=-0.0, string_value=b"\xff",
                        identifier_value="")]))])])])
    return {"proto2-descriptors": fds, "proto2-explicit-defaults": explicit}


HAND_WRITTEN = dict(NODE_MESSAGES)
HAND_WRITTEN.update(KINDS_MESSAGES)
HAND_WRITTEN.update(_oneof_branches())
HAND_WRITTEN.update(_proto2_messages())

# protobuf-c's pack drops a proto3 double or float that is -0.0 (its zero test is `== 0`),
# which json_format keeps: to-json is compared, from-json comes back with 0.0 there.
NEGATIVE_ZERO = {
    "scalars-negative-zero": scalars(f_double=-0.0, f_float=-0.0),
}


# json_format folds Timestamp nanos outside [0, 1e9) into the seconds when printing, so these
# do not come back as they were: to-json only.
UNNORMALIZED = {
    "wkt-negative-nanos": kp.Wkt(timestamp=ts(0, -1)),
    "wkt-nanos-carry": kp.Wkt(timestamp=ts(0, 1500000000)),
    "wkt-nanos-min": kp.Wkt(timestamp=ts(100, -2**31)),
    "wkt-nanos-max": kp.Wkt(timestamp=ts(-100, 2**31 - 1)),
}


@pytest.mark.parametrize("name", sorted(UNNORMALIZED))
def test_unnormalized_timestamp(name):
    check_to_json(UNNORMALIZED[name])


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written(name):
    check_both(HAND_WRITTEN[name])


@pytest.mark.parametrize("name", sorted(NEGATIVE_ZERO))
def test_negative_zero(name):
    msg = NEGATIVE_ZERO[name]
    check_to_json(msg)
    assert tool_to_json(msg) == {"fDouble": -0.0, "fFloat": -0.0}
    assert tool_from_json(type(msg), py_json(msg)) == type(msg)()


def test_enough_messages():
    assert len(HAND_WRITTEN) + len(NEGATIVE_ZERO) + len(UNNORMALIZED) >= 30


# ------------------------------------------------------------------------------------------
# generated messages: every field of every type


ROOTS = [kp.Kinds.DESCRIPTOR, descriptor_pb2.FileDescriptorSet.DESCRIPTOR]


def reachable_types():
    seen = {}

    def add(d):
        if d.full_name in seen:
            return
        seen[d.full_name] = d
        for f in d.fields:
            if f.type == FD.TYPE_MESSAGE:
                add(f.message_type)

    for m in pb.DESCRIPTOR.services_by_name["Node"].methods:
        add(m.input_type)
        add(m.output_type)
    for d in ROOTS:
        add(d)
    return seen


TYPES = reachable_types()
# map entries are not messages of their own in JSON: they are generated as parts of maps
MESSAGE_TYPES = sorted(n for n, d in TYPES.items() if not d.GetOptions().map_entry)


def message_class(d):
    from google.protobuf import message_factory
    return message_factory.MessageFactory(d.file.pool).GetPrototype(d)


def is_map(f):
    return f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


STRINGS = ["", "a", "héllo", "✓ 😀", TRICKY, "\u2028", "fooBar", "x" * 70, "end_time"]
BYTES = [b"", b"\x00", b"\xff\xfe\xfd", ALL_BYTES[:7], ALL_BYTES[250:], b"abc"]
DOUBLES = [0.1, -2.5, 1.7976931348623157e308, 5e-324, 2.2250738585072014e-308, 1e21, 1e-7,
           123456789.0, 0.30000000000000004, math.inf, -math.inf, 1 / 3, 1e16, 2.0**53 + 2]
FLOATS = [f32(x) for x in (0.1, -2.5, 3.4028234663852886e38, 1.401298464324817e-45, 1e-30,
                           16777217.0, 0.3, 1e10, math.inf, -math.inf)]
PATHS = ["a", "foo_bar", "foo_bar.baz_qux", "x1", "a.b.c", "labels", "end_time"]
MAX_DEPTH = 4


class Generator:
    """Messages for any descriptor: with every field set (each oneof at member `pick`) or a
    random part of them. Values are the edges of each type and random ones, all valid for
    json_format (no NaN, no -0.0: those have their own tests)."""

    def __init__(self, seed, full):
        self.r = random.Random(seed)
        self.full = full
        self.pick = seed

    def scalar(self, f):
        r, t = self.r, f.type
        if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
            return r.choice([1, -1, 2**31 - 1, -2**31, r.randint(-2**31, 2**31 - 1)])
        if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
            return r.choice([1, 2**32 - 1, r.randint(0, 2**32 - 1)])
        if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
            return r.choice([1, -1, 2**63 - 1, -2**63, 2**53 + 1, r.randint(-2**63, 2**63 - 1)])
        if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
            return r.choice([1, 2**64 - 1, 2**53 + 1, r.randint(0, 2**64 - 1)])
        if t == FD.TYPE_DOUBLE:
            return r.choice(DOUBLES + [r.uniform(-1e6, 1e6)])
        if t == FD.TYPE_FLOAT:
            return r.choice(FLOATS + [f32(r.uniform(-1e6, 1e6))])
        if t == FD.TYPE_BOOL:
            return r.choice([True, False])
        if t == FD.TYPE_STRING:
            return r.choice(STRINGS)
        if t == FD.TYPE_BYTES:
            return r.choice(BYTES + [bytes(r.randrange(256) for _ in range(r.randint(0, 9)))])
        if t == FD.TYPE_ENUM:
            numbers = [v.number for v in f.enum_type.values]
            if f.file.syntax == "proto3":
                numbers += [77, -3]  # open enums: numbers without a name
            return r.choice(numbers)
        raise AssertionError(f"no values for {f.full_name}")

    def key(self, f):
        if f.type == FD.TYPE_STRING:
            return self.r.choice(STRINGS)
        return self.scalar(f)

    def count(self):
        return 2 if self.full else self.r.randint(0, 3)

    def fill(self, msg, depth=1):
        d, r = msg.DESCRIPTOR, self.r
        if d.full_name == "google.protobuf.Timestamp":
            msg.seconds = r.randint(-62135596800, 253402300799)
            msg.nanos = r.choice([0, r.randint(0, 999) * 10**6, r.randint(0, 10**6 - 1) * 1000,
                                  r.randint(0, 10**9 - 1)])
            return msg
        if d.full_name == "google.protobuf.Duration":
            sign = r.choice([1, -1])
            msg.seconds = sign * r.choice([0, 1, 315576000000, r.randint(0, 315576000000)])
            msg.nanos = sign * r.choice([0, 10**6, 1000, r.randint(0, 10**9 - 1)])
            return msg
        if d.full_name == "google.protobuf.FieldMask":
            msg.paths.extend(r.sample(PATHS, r.randint(1, 3)))
            return msg
        chosen = {}
        for o in d.oneofs:
            if self.full:
                chosen[o.name] = o.fields[self.pick % len(o.fields)]
            else:
                chosen[o.name] = r.choice(list(o.fields) + [None])
        for f in d.fields:
            if f.containing_oneof is not None:
                if chosen[f.containing_oneof.name] is not f:
                    continue
            elif not self.full and f.label != FD.LABEL_REQUIRED and r.random() < 0.5:
                continue
            self.set(msg, f, depth)
        return msg

    def set(self, msg, f, depth):
        deep = depth >= MAX_DEPTH
        if is_map(f):
            kf = f.message_type.fields_by_name["key"]
            vf = f.message_type.fields_by_name["value"]
            if vf.type == FD.TYPE_MESSAGE and deep:
                return
            m = getattr(msg, f.name)
            for _ in range(self.count()):
                k = self.key(kf)
                if vf.type == FD.TYPE_MESSAGE:
                    self.fill(m[k], depth + 1)
                else:
                    m[k] = self.scalar(vf)
        elif f.label == FD.LABEL_REPEATED:
            if f.type == FD.TYPE_MESSAGE:
                if not deep:
                    for _ in range(self.count()):
                        self.fill(getattr(msg, f.name).add(), depth + 1)
            else:
                getattr(msg, f.name).extend(self.scalar(f) for _ in range(self.count()))
        elif f.type == FD.TYPE_MESSAGE:
            if not deep or f.containing_oneof is not None:
                sub = getattr(msg, f.name)
                sub.SetInParent()
                if not deep:
                    self.fill(sub, depth + 1)
        else:
            setattr(msg, f.name, self.scalar(f))


def generated(name):
    d = TYPES[name]
    cls = message_class(d)
    picks = max([len(o.fields) for o in d.oneofs] + [1])
    out = [Generator(pick, True).fill(cls()) for pick in range(picks)]
    out += [Generator(1000 + i, False).fill(cls()) for i in range(3)]
    return out


@pytest.mark.parametrize("name", MESSAGE_TYPES)
def test_generated(name):
    # a few at once: the sanitized tool is slow to start
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(check_both, generated(name)))


def test_tool_knows_every_type():
    p = subprocess.run([TOOL, "list"], capture_output=True, check=True, env=TOOL_ENV)
    assert sorted(p.stdout.decode().split()) == sorted(TYPES)


def test_every_map_field_is_covered():
    """Every map field of a reachable type gets entries in the generated messages, so
    test_generated checks that pbjson_to_json() makes an object of each (its map detection
    goes by names, json_format by the map_entry option)."""
    maps = [(d.full_name, f.name) for d in TYPES.values() for f in d.fields if is_map(f)]
    assert len(maps) >= 20
    for type_full_name, field in maps:
        assert any(len(getattr(m, field)) > 0 for m in generated(type_full_name)), field
    # and no repeated message field that is not a map looks like one to the name rule
    for d in TYPES.values():
        for f in d.fields:
            if (f.label == FD.LABEL_REPEATED and f.type == FD.TYPE_MESSAGE and not is_map(f)):
                entry = "".join(p[:1].upper() + p[1:] for p in f.name.split("_")) + "Entry"
                assert f.message_type.name != entry, f.full_name


# ------------------------------------------------------------------------------------------
# input json_format accepts in other forms than MessageToJson's: same message both ways

ACCEPTED = [
    # proto field names, nulls, both spellings
    (pb.CreateSandboxRequest,
     '{"sandbox_id": "a", "spec": {"vcpu_count": 2, "template_id": "t", "disk_size_mib": 5}}'),
    (pb.CreateSandboxRequest, '{"sandboxId": null, "spec": null}'),
    (pb.CreateSandboxRequest, '{"spec": {"templateId": "t", "snapshotId": null}}'),
    (pb.CreateSandboxRequest, '{"spec": {"snapshotId": null, "templateId": "t"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"labels": null, "network": {"allowCidrs": null}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"labels": {}, "network": {"allowCidrs": []}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 1, "vcpu_count": 2}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 1, "vcpu_count": null}}'),
    (pb.Sandbox, '{"lastOperation": {"op": "a", "steps": [{"name": "x"}]}, '
                 '"last_operation": {"totalUs": "5", "steps": [{"name": "y"}]}}'),
    (pb.Sandbox, '{"createTime": "2023-01-01T00:00:00Z", "create_time": "2024-01-01T00:00:00Z"}'),
    (pb.UpdateSandboxRequest, '{"updateMask": "a,b", "update_mask": "endTime"}'),
    (pb.CreateSandboxRequest, ' \n\t{ "sandboxId" : "\\u00e9\\/\\ud83d\\ude00" } \r\n'),
    # integers: numbers, strings, exponents
    (kp.Scalars, '{"fInt32": "5", "fInt64": "-5", "fUint32": "007", "fUint64": "+5"}'),
    (kp.Scalars, '{"fInt32": 1e3, "fInt64": 1.0, "fUint64": 18446744073709551615,'
                 ' "fSint64": -9223372036854775808, "fFixed64": "18446744073709551615"}'),
    (kp.Scalars, '{"fSfixed64": -9.223372036854775808e18, "fSint32": -0.0, "fFixed32": "-0"}'),
    (kp.Scalars, '{"fInt64": 1e18, "fUint64": 1.8446744073709550e19}'),
    # enums by name, number, number in a string, unknown number
    (kp.Scalars, '{"fEnum": "COLOR_RED"}'),
    (kp.Scalars, '{"fEnum": 2}'),
    (kp.Scalars, '{"fEnum": "2"}'),
    (kp.Scalars, '{"fEnum": 77}'),
    (kp.Scalars, '{"fEnum": -1}'),
    (kp.Scalars, '{"fEnum": 2.0}'),
    (pb.ListSandboxesRequest, '{"state": "SANDBOX_STATE_FAILED"}'),
    # floats
    (kp.Scalars, '{"fDouble": "1.5", "fFloat": "-1e-3"}'),
    (kp.Scalars, '{"fDouble": "NaN", "fFloat": "Infinity"}'),
    (kp.Scalars, '{"fDouble": "-Infinity", "fFloat": "NaN"}'),
    (kp.Scalars, '{"fDouble": 5, "fFloat": 16777217}'),
    (kp.Scalars, '{"fDouble": ".5", "fFloat": "5."}'),
    (kp.Scalars, '{"fDouble": 1e-400, "fFloat": 1e-50}'),
    (kp.Scalars, '{"fDouble": 18446744073709551615, "fFloat": -9223372036854775808}'),
    (kp.Scalars, '{"fFloat": 3.4028234663852886e38}'),
    (kp.Scalars, '{"fFloat": 0.1, "fDouble": 0.1}'),
    (kp.Scalars, '{"fFloat": 1.00000017881393432617187499}'),
    # bytes: URL-safe, unpadded, partial padding, unused bits set
    (kp.Scalars, '{"fBytes": "-_8"}'),
    (kp.Scalars, '{"fBytes": "+/8="}'),
    (kp.Scalars, '{"fBytes": "YQ"}'),
    (kp.Scalars, '{"fBytes": "YQ="}'),
    (kp.Scalars, '{"fBytes": "YR=="}'),
    (kp.Scalars, '{"fBytes": "YWJj="}'),
    (kp.Scalars, '{"fBytes": "="}'),
    (kp.Scalars, '{"fBytes": ""}'),
    (kp.Repeated, '{"rBytes": ["", "AA==", "_-8"]}'),
    # booleans, strings
    (kp.Scalars, '{"fBool": false, "fString": ""}'),
    (kp.Scalars, '{"fString": "\\ud800\\udc00"}'),
    # maps: keys of every kind, the same integer key twice
    (kp.Maps, '{"int32String": {"-2147483648": "a", "2147483647": "b", "+5": "c"}}'),
    (kp.Maps, '{"int32String": {"01": "a", "1": "b", "2": "c", "+1": "d"}}'),
    (kp.Maps, '{"int64String": {"-0": "a", "0": "b"}, "boolString": {"true": "", "false": "f"}}'),
    (kp.Maps, '{"uint64String": {"18446744073709551615": "x"}, "fixed32String": {"0": "y"}}'),
    (kp.Maps, '{"stringMessage": {"a": {}, "b": {"fInt32": 1}}, "string_enum": {"x": 3}}'),
    (kp.Maps, '{"stringTimestamp": {"a": "1970-01-01T00:00:00Z"}, '
              '"stringDuration": {"b": "-0.000000001s"}}'),
    # oneofs: one member set to its zero value, the others null
    (kp.Oneofs, '{"oInt32": 0, "oString": null, "oMessage": null}'),
    (kp.Oneofs, '{"oString": null}'),
    (kp.Oneofs, '{"oEmpty": {}, "sNumber": 0}'),
    (kp.Oneofs, '{"o_message": {"f_int32": 1}, "sName": ""}'),
    # well-known types
    (kp.Wkt, '{"timestamp": "2023-01-01T10:00:00+02:00"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T10:00:00-05:30"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T10:00:00.1Z"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T10:00:00.12345Z"}'),
    (kp.Wkt, '{"timestamp": "1969-12-31T23:59:59.999999999Z"}'),
    (kp.Wkt, '{"timestamp": "2024-02-29T00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "0001-01-01T00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "9999-12-31T23:59:59.999999999Z"}'),
    (kp.Wkt, '{"timestamp": "0001-01-01T00:59:00+00:59"}'),
    (kp.Wkt, '{"duration": "0s"}'),
    (kp.Wkt, '{"duration": "-0s"}'),
    (kp.Wkt, '{"duration": "-0.5s"}'),
    (kp.Wkt, '{"duration": "1.000000001s"}'),
    (kp.Wkt, '{"duration": "-315576000000.999999999s"}'),
    (kp.Wkt, '{"duration": "00012s"}'),
    (kp.Wkt, '{"fieldMask": ""}'),
    (kp.Wkt, '{"fieldMask": "a,,b"}'),
    (kp.Wkt, '{"fieldMask": "fooBar.bazQux,x"}'),
    (kp.Wkt, '{"fieldMask": "FooBar"}'),
    (kp.Wkt, '{"empty": {}, "timestamp": null}'),
    (kp.Nested, '{"child": {"child": {"child": {}}}, "children": [{}, {"label": "x"}]}'),
    # the top level may be any well-known type's form
    (timestamp_pb2.Timestamp, '"2023-06-01T12:00:00.5Z"'),
    (duration_pb2.Duration, '"3s"'),
    (field_mask_pb2.FieldMask, '"a,b"'),
]


@pytest.mark.parametrize("cls,text", ACCEPTED, ids=[t for _, t in ACCEPTED])
def test_accepted(cls, text):
    expected = python_from_json(cls, text)
    assert expected is not None, "json_format refuses it: not a test of what both accept"
    got = tool_from_json(cls, text)
    assert got is not None, run_tool("from-json", type_name(cls), text.encode()).stderr
    assert same(got, expected), (py_json(got), py_json(expected))


def nested(depth):
    m = kp.Nested(label="bottom")
    for _ in range(depth - 1):
        m = kp.Nested(child=m)
    return m


def test_nesting_limit():
    # json_format's max_recursion_depth is 100 messages; the tool's the same
    deepest = nested(100)
    assert python_from_json(kp.Nested, py_json(deepest)) is not None
    assert tool_from_json(kp.Nested, py_json(deepest)) == deepest
    check_to_json(deepest)
    too_deep = nested(101)
    assert python_from_json(kp.Nested, py_json(too_deep)) is None
    assert tool_from_json(kp.Nested, py_json(too_deep)) is None


def test_nesting_limit_encoding():
    # Deliberate: the tool refuses to encode more than 100 levels too (protobuf-c's unpack has
    # no limit, and the stack is the same); json_format encodes any depth.
    msg = nested(101)
    json_format.MessageToJson(msg)
    assert run_tool("to-json", type_name(msg), msg.SerializeToString()).returncode == 1


# ------------------------------------------------------------------------------------------
# input json_format refuses: the tool too

REJECTED = [
    # unknown fields, at the top and deeper
    (pb.CreateSandboxRequest, '{"nope": 1}'),
    (pb.CreateSandboxRequest, '{"spec": {"nope": 1}}'),
    (pb.CreateSandboxRequest, '{"SandboxId": "a"}'),
    (pb.CreateSandboxRequest, '{"spec": {"network": {"allowCIDRs": []}}}'),
    (kp.Names, '{"withDigit_1": 1}'),
    (kp.Names, '{"leading": 1}'),
    # wrong types
    (pb.CreateSandboxRequest, '{"sandboxId": 5}'),
    (pb.CreateSandboxRequest, '{"sandboxId": ["a"]}'),
    (pb.CreateSandboxRequest, '{"sandboxId": true}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": "x"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": true}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 1.5}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": "1.0"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": "1e3"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": ""}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": " 1"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": {}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"hugePages": "true"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"hugePages": 1}}'),
    (pb.CreateSandboxRequest, '{"spec": {"labels": {"a": 1}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"labels": {"a": null}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"network": {"allowCidrs": "x"}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"network": {"allowCidrs": [null]}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"network": {"allowCidrs": [1]}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"network": {"allowCidrs": {"a": "b"}}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"onExpiry": "EXPIRY_ACTION_NOPE"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"onExpiry": "expiry_action_pause"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"onExpiry": {}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"onExpiry": 1.5e10}}'),
    (pb.CreateSandboxRequest, '{"spec": 5}'),
    (pb.CreateSandboxRequest, '{"spec": true}'),
    (pb.CreateSandboxRequest, '{"spec": "x"}'),
    (pb.CreateSandboxRequest, '{"spec": {"labels": []}}'),
    (pb.CreateSandboxRequest, '{"spec": {"labels": "a=b"}}'),
    (pb.ExecRequest, '{"start": {"argv": [null]}}'),
    (pb.ExecRequest, '{"stdinData": 5}'),
    (pb.ExecRequest, '{"stdinData": ["YQ=="]}'),
    (pb.ListSandboxesResponse, '{"sandboxes": [null]}'),
    (pb.ListSandboxesResponse, '{"sandboxes": {}}'),
    (kp.Scalars, '5'),
    (kp.Scalars, 'null'),
    (kp.Scalars, '"x"'),
    # integers out of range
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": -1}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 4294967296}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": "4294967296"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 4294967296.0}}'),
    (pb.CreateSandboxRequest, '{"spec": {"diskSizeMib": "18446744073709551616"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"diskSizeMib": 18446744073709551616}}'),
    (pb.CreateSandboxRequest, '{"spec": {"diskSizeMib": -1}}'),
    (pb.CreateSandboxRequest, '{"spec": {"diskSizeMib": "-1"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"diskSizeMib": 1.8446744073709552e19}}'),
    (pb.ExecRequest, '{"signal": {"signal": 2147483648}}'),
    (pb.ExecRequest, '{"signal": {"signal": -2147483649}}'),
    (pb.ExecRequest, '{"signal": {"signal": "99999999999999999999999"}}'),
    (kp.Scalars, '{"fInt64": "9223372036854775808"}'),
    (kp.Scalars, '{"fInt64": "-9223372036854775809"}'),
    (kp.Scalars, '{"fInt64": 9223372036854775808}'),
    (kp.Scalars, '{"fSint64": -9223372036854775809}'),
    (kp.Scalars, '{"fInt64": 1e19}'),
    (kp.Scalars, '{"fInt32": 1e10}'),
    (kp.Scalars, '{"fSfixed32": "-2147483649"}'),
    (kp.Scalars, '{"fFixed32": -1}'),
    (kp.Scalars, '{"fUint64": "18446744073709551616"}'),
    (kp.Scalars, '{"fEnum": 2147483648}'),
    (kp.Scalars, '{"fEnum": "-2147483649"}'),
    (kp.Maps, '{"uint32String": {"4294967296": "x"}}'),
    (kp.Maps, '{"int32String": {"-2147483649": "x"}}'),
    (kp.Maps, '{"int32String": {" 1": "x"}}'),
    (kp.Maps, '{"int32String": {"1.5": "x"}}'),
    (kp.Maps, '{"int32String": {"x": "x"}}'),
    (kp.Maps, '{"int32String": {"": "x"}}'),
    (kp.Maps, '{"boolString": {"True": "x"}}'),
    (kp.Maps, '{"boolString": {"1": "x"}}'),
    (kp.Maps, '{"stringMessage": {"a": null}}'),
    (kp.Maps, '{"stringMessage": {"a": 5}}'),
    # floats
    (kp.Scalars, '{"fDouble": NaN}'),
    (kp.Scalars, '{"fDouble": Infinity}'),
    (kp.Scalars, '{"fDouble": -Infinity}'),
    (kp.Scalars, '{"fDouble": "nan"}'),
    (kp.Scalars, '{"fDouble": "0x10"}'),
    (kp.Scalars, '{"fDouble": "1.5x"}'),
    (kp.Scalars, '{"fDouble": ""}'),
    (kp.Scalars, '{"fDouble": 1e400}'),
    (kp.Scalars, '{"fDouble": [1]}'),
    (kp.Scalars, '{"fFloat": 1e39}'),
    (kp.Scalars, '{"fFloat": -3.40282357e38}'),
    # strings, bytes
    (kp.Scalars, '{"fString": "\\ud800"}'),
    (kp.Scalars, '{"fString": "\\udc00x"}'),
    (kp.Scalars, '{"fString": "a\\ud800b\\ud800"}'),
    (kp.Maps, '{"stringString": {"\\ud800": "x"}}'),
    (kp.Scalars, '{"fBytes": "Y"}'),
    (kp.Scalars, '{"fBytes": "YWJjZ"}'),
    (kp.Scalars, '{"fBytes": "=YQ"}'),
    (kp.Scalars, '{"fBytes": 5}'),
    # oneofs: two members
    (pb.CreateSandboxRequest, '{"spec": {"templateId": "a", "snapshotId": "b"}}'),
    (pb.CreateSandboxRequest, '{"spec": {"templateId": "a", "snapshot_id": ""}}'),
    (kp.Oneofs, '{"oInt32": 1, "o_int32": 2}'),
    (kp.Oneofs, '{"oInt32": 0, "oString": ""}'),
    (pb.ExecRequest, '{"start": {}, "closeStdin": {}}'),
    # timestamps
    (kp.Wkt, '{"timestamp": "2023-13-01T00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "2023-00-01T00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "2023-02-29T00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "2023-04-31T00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T24:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T00:60:00Z"}'),
    (kp.Wkt, '{"timestamp": "2016-12-31T23:59:60Z"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01 00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01t00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T00:00:00z"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T00:00:00"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T00:00:00Zjunk"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T00:00:00.1234567890Z"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T00:00:00+0500"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01"}'),
    (kp.Wkt, '{"timestamp": "0000-01-01T00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": "10000-01-01T00:00:00Z"}'),
    (kp.Wkt, '{"timestamp": ""}'),
    (kp.Wkt, '{"timestamp": 1672531200}'),
    (kp.Wkt, '{"timestamp": {"seconds": 1}}'),
    (timestamp_pb2.Timestamp, 'null'),
    # durations
    (kp.Wkt, '{"duration": "1"}'),
    (kp.Wkt, '{"duration": "1m"}'),
    (kp.Wkt, '{"duration": "1S"}'),
    (kp.Wkt, '{"duration": "s"}'),
    (kp.Wkt, '{"duration": "-s"}'),
    (kp.Wkt, '{"duration": ".5s"}'),
    (kp.Wkt, '{"duration": "--1s"}'),
    (kp.Wkt, '{"duration": "1,5s"}'),
    (kp.Wkt, '{"duration": "315576000001s"}'),
    (kp.Wkt, '{"duration": "-315576000001s"}'),
    (kp.Wkt, '{"duration": "99999999999999999999s"}'),
    (kp.Wkt, '{"duration": 1.5}'),
    (kp.Wkt, '{"duration": ""}'),
    # field masks
    (kp.Wkt, '{"fieldMask": "foo_bar"}'),
    (kp.Wkt, '{"fieldMask": "a,b_c"}'),
    (kp.Wkt, '{"fieldMask": ["a"]}'),
    (kp.Wkt, '{"fieldMask": 5}'),
    (kp.Wkt, '{"empty": {"x": 1}}'),
    (kp.Wkt, '{"empty": 5}'),
    # JSON itself
    (pb.CreateSandboxRequest, ''),
    (pb.CreateSandboxRequest, ' '),
    (pb.CreateSandboxRequest, '{'),
    (pb.CreateSandboxRequest, '{"sandboxId": "a",}'),
    (pb.CreateSandboxRequest, "{'sandboxId': 'a'}"),
    (pb.CreateSandboxRequest, '{sandboxId: "a"}'),
    (pb.CreateSandboxRequest, '{"sandboxId": "a"} x'),
    (pb.CreateSandboxRequest, '{"sandboxId": "a"}{}'),
    (pb.CreateSandboxRequest, '{"sandboxId": "a\tb"}'),
    (pb.CreateSandboxRequest, '{"sandboxId": "a\nb"}'),
    (pb.CreateSandboxRequest, '{"sandboxId": "\\x41"}'),
    (pb.CreateSandboxRequest, '{"sandboxId": "a", "sandboxId": "b"}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 1, "vcpuCount": 1}}'),
    (pb.CreateSandboxRequest, '{"spec": {"labels": {"a": "b", "a": "c"}}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 01}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": -01}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 1.}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 1.e3}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": .5}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": +1}}'),
    (pb.CreateSandboxRequest, '{"spec": {"vcpuCount": 0x10}}'),
    (pb.CreateSandboxRequest, '/* c */ {}'),
    (pb.CreateSandboxRequest, '{"sandboxId": nul}'),
    (pb.CreateSandboxRequest, '[{}]'),
]


@pytest.mark.parametrize("cls,text", REJECTED, ids=[t for _, t in REJECTED])
def test_rejected(cls, text):
    assert python_from_json(cls, text) is None, "json_format accepts it: not a test of refusal"
    assert tool_from_json(cls, text) is None


def test_rejected_non_utf8():
    # json.loads cannot even take these; the tool's parser refuses them too
    for raw in (b'{"sandboxId": "\xff"}', b'{"sandboxId": "\xc0\x80"}',
                b'{"sandboxId": "\xed\xa0\x80"}', b'{"sandboxId": "a"}\x00',
                b'{"\xff": 1}'):
        with pytest.raises(Exception):
            json_format.Parse(raw, pb.CreateSandboxRequest())
        assert run_tool("from-json", "ember.v1.CreateSandboxRequest", raw).returncode == 1


def test_error_messages_name_the_field():
    def error(cls, text):
        p = run_tool("from-json", type_name(cls), text.encode())
        assert p.returncode == 1
        return p.stderr.decode().strip().removeprefix("pbjson-tool: ")

    assert error(pb.CreateSandboxRequest, '{"spec": {"vcpuCount": "x"}}') == \
        "spec.vcpuCount: expected an integer"
    assert error(pb.CreateSandboxRequest, '{"spec": {"vcpu_count": -1}}') == \
        "spec.vcpu_count: out of range for uint32"
    assert error(pb.CreateSandboxRequest, '{"spec": {"labels": {"a": 1}}}') == \
        'spec.labels["a"]: expected a string'
    assert error(pb.ListSandboxesResponse, '{"sandboxes": [{}, {"spec": {"nope": 1}}]}') == \
        "sandboxes[1].spec.nope: no such field in ember.v1.SandboxSpec"
    assert error(pb.CreateSandboxRequest, '{"x": 1}') == \
        "x: no such field in ember.v1.CreateSandboxRequest"
    assert error(pb.CreateSandboxRequest, '[]') == "expected an object"
    assert "endTime" in error(pb.CreateSandboxRequest, '{"spec": {"endTime": "yesterday"}}')
    assert "byte" in error(pb.CreateSandboxRequest, '{"a": 1,}')
    assert "twice" in error(pb.CreateSandboxRequest, '{"a": 1, "a": 1}')


# ------------------------------------------------------------------------------------------
# messages JSON cannot say: json_format refuses to encode them, the tool too


def varint(n):
    out = bytearray()
    while True:
        out.append(n & 0x7f | (0x80 if n > 0x7f else 0))
        n >>= 7
        if not n:
            return bytes(out)


def wire_string(field_number, raw):
    """A length-delimited field, written by hand: Python will not serialize what these tests
    need (strings that are not UTF-8, map keys twice)."""
    return varint(field_number << 3 | 2) + varint(len(raw)) + raw


UNENCODABLE = [
    ("duration-sign-mismatch", kp.Wkt(duration=dur(1, -1))),
    ("duration-nanos-range", kp.Wkt(duration=dur(0, 10**9))),
    ("duration-seconds-range", kp.Wkt(duration=dur(315576000001))),
    ("timestamp-year-10000", kp.Wkt(timestamp=ts(253402300800))),
    ("timestamp-year-0", kp.Wkt(timestamp=ts(-62135596801))),
    ("timestamp-nanos-carry", kp.Wkt(timestamp=ts(253402300799, 10**9))),
    ("field-mask-upper", kp.Wkt(field_mask=field_mask_pb2.FieldMask(paths=["fooBar"]))),
    ("field-mask-digit", kp.Wkt(field_mask=field_mask_pb2.FieldMask(paths=["a_1"]))),
    ("field-mask-trailing", kp.Wkt(field_mask=field_mask_pb2.FieldMask(paths=["a_"]))),
    ("field-mask-double", kp.Wkt(field_mask=field_mask_pb2.FieldMask(paths=["a__b"]))),
]


@pytest.mark.parametrize("name,msg", UNENCODABLE, ids=[n for n, _ in UNENCODABLE])
def test_unencodable(name, msg):
    with pytest.raises(Exception):
        json_format.MessageToJson(msg)
    assert run_tool("to-json", type_name(msg), msg.SerializeToString()).returncode == 1


def test_unencodable_not_utf8():
    # Python's parser refuses the bytes already; protobuf-c does not check, pbjson_to_json does
    for raw in (b"\xff", b"a\xc3", b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80"):
        data = wire_string(1, raw)
        with pytest.raises(Exception):
            pb.GetSandboxRequest().ParseFromString(data)
        assert run_tool("to-json", "ember.v1.GetSandboxRequest", data).returncode == 1
    # a map key too
    entry = wire_string(1, b"\xff") + wire_string(2, b"v")
    assert run_tool("to-json", "ember.v1.ListSandboxesRequest",
                    wire_string(2, entry)).returncode == 1


def test_duplicate_map_keys_on_the_wire():
    # the wire may repeat a map key: the last value wins, as in json_format
    entry1 = wire_string(1, b"k") + wire_string(2, b"first")
    entry2 = wire_string(1, b"k") + wire_string(2, b"last")
    data = wire_string(2, entry1) + wire_string(2, entry2)
    msg = pb.ListSandboxesRequest()
    msg.ParseFromString(data)
    assert json.loads(py_json(msg)) == {"labelSelector": {"k": "last"}}
    p = run_tool("to-json", "ember.v1.ListSandboxesRequest", data)
    assert json.loads(p.stdout) == {"labelSelector": {"k": "last"}}


def test_map_entry_without_value():
    # an entry on the wire without its value: the value's default ({} for a message)
    entry = wire_string(1, b"k")
    data = wire_string(20, entry)
    msg = kp.Maps()
    msg.ParseFromString(data)
    check_to_json(msg)
    data = wire_string(21, wire_string(1, b"t"))  # a Timestamp value: the epoch
    msg = kp.Maps()
    msg.ParseFromString(data)
    check_to_json(msg)


# ------------------------------------------------------------------------------------------
# deliberate differences: json_format accepts these, the tool refuses (pbjson.h lists why)

STRICTER = [
    # a message given as something else than an object
    (kp.Kinds, '{"scalars": ""}'),
    (kp.Kinds, '{"scalars": []}'),
    (kp.Kinds, '[]'),
    # enums from a non-integral number or a bool
    (kp.Scalars, '{"fEnum": 1.5}'),
    (kp.Scalars, '{"fEnum": true}'),
    (kp.Scalars, '{"fEnum": " 1"}'),
    # a bool for a float
    (kp.Scalars, '{"fFloat": true}'),
    (kp.Scalars, '{"fDouble": false}'),
    # Python's int() and float() syntax beyond JSON's
    (kp.Scalars, '{"fInt32": "\\t5"}'),
    (kp.Scalars, '{"fInt32": "1_0"}'),
    (kp.Scalars, '{"fInt64": "5\\n"}'),
    (kp.Scalars, '{"fFloat": " 1.5 "}'),
    (kp.Scalars, '{"fFloat": "1_0.5"}'),
    (kp.Scalars, '{"fDouble": "inf"}'),
    (kp.Scalars, '{"fDouble": "-infinity"}'),
    (kp.Scalars, '{"fDouble": "NAN"}'),
    # floats beyond their range: json_format makes them Infinity (except as JSON floats)
    (kp.Scalars, '{"fFloat": "1e39"}'),
    (kp.Scalars, '{"fFloat": 1000000000000000000000000000000000000000}'),
    (kp.Scalars, '{"fDouble": "1e400"}'),
    # an integer beyond 64 bits is refused by the parser (json-c would clamp it)
    (kp.Scalars, '{"fDouble": 123456789012345678901234567890}'),
    # base64 with junk or data after the padding
    (kp.Scalars, '{"fBytes": "YQ==YQ=="}'),
    (kp.Scalars, '{"fBytes": "Y Q=="}'),
    (kp.Scalars, '{"fBytes": "Y$Q=="}'),
    (kp.Scalars, '{"fBytes": "YQ==\\n"}'),
    # U+0000: protobuf-c's strings are C strings
    (kp.Scalars, '{"fString": "a\\u0000b"}'),
    (kp.Maps, '{"stringString": {"a\\u0000": "b"}}'),
    # timestamps and durations beyond RFC 3339 and the mapping's form
    (kp.Wkt, '{"timestamp": "2023-01-01T00:00:00.Z"}'),
    (kp.Wkt, '{"timestamp": "2023-1-1T0:0:0Z"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T00:00:00+5:0"}'),
    (kp.Wkt, '{"timestamp": "2023-01-01T00:00:00+24:00"}'),
    (kp.Wkt, '{"timestamp": "2023-01- 1T00:00:00Z"}'),
    # a timestamp the offset moves out of years 1..9999 (json_format takes it, and then
    # cannot print it)
    (kp.Wkt, '{"timestamp": "0001-01-01T00:00:00+01:00"}'),
    (kp.Wkt, '{"timestamp": "9999-12-31T23:59:59-01:00"}'),
    (kp.Wkt, '{"duration": "1.s"}'),
    (kp.Wkt, '{"duration": "+1s"}'),
    (kp.Wkt, '{"duration": " 1s"}'),
    (kp.Wkt, '{"duration": "1_0s"}'),
    (kp.Wkt, '{"duration": "1.0000000001s"}'),
]


@pytest.mark.parametrize("cls,text", STRICTER, ids=[t for _, t in STRICTER])
def test_stricter_than_json_format(cls, text):
    assert python_from_json(cls, text) is not None, "json_format refuses it too: move to REJECTED"
    assert tool_from_json(cls, text) is None


def test_same_key_twice_keeps_the_last():
    # json_format refuses a key twice in one object; so does pbjson_parse(). The same field
    # under both of its names is not a duplicate key: json_format takes the last, so does the
    # tool (test_accepted). This is what the tool does when the JSON does not come through
    # pbjson_parse() but through plain json-c, which keeps the last value.
    assert python_from_json(kp.Scalars, '{"fInt32": 1, "fInt32": 2}') is None
    assert tool_from_json(kp.Scalars, '{"fInt32": 1, "fInt32": 2}') is None


def test_looser_than_json_format():
    # json_format prints FLT_MAX as 3.4028235e+38 and then refuses to read that back (above
    # FLT_MAX as a double); the tool takes any number that rounds to a finite float.
    for text in ('{"fFloat": 3.4028235e+38}', '{"fFloat": -3.4028235e38}'):
        assert python_from_json(kp.Scalars, text) is None
        got = tool_from_json(kp.Scalars, text)
        assert got is not None and abs(got.f_float) == f32(3.4028234663852886e38)
