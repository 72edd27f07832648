# fcsim against Firecracker's own API contract (firecracker-v1.16.1.yaml, the swagger file):
#   - for every request body definition, a body with every property (generated from the
#     swagger) is accepted where fcsim accepts that request, and every body fcsim accepts
#     validates against the swagger;
#   - leaving out each required property is refused with 400 and a fault_message naming it;
#   - a property the swagger does not define is refused (deny_unknown_fields);
#   - GET answers validate against the swagger's response definitions.
# The swagger lives in the project's shared folder; without it these tests skip.

import copy
import os
import shutil
import tempfile

import pytest

from conftest import SRCDIR
from fcsim_util import Fcsim, build_rootfs

SWAGGER = os.path.abspath(os.path.join(SRCDIR, "..", "shared", "firecracker",
                                       "firecracker-v1.16.1.yaml"))

pytestmark = [
    pytest.mark.skipif(not os.path.exists(SWAGGER),
                       reason=f"Firecracker's swagger file is not here ({SWAGGER}): the "
                              "contract test needs the project's shared folder"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


def load_swagger():
    import yaml
    with open(SWAGGER) as f:
        return yaml.safe_load(f)


def resolve(spec, schema):
    while "$ref" in schema:
        schema = spec["definitions"][schema["$ref"].split("/")[-1]]
    return schema


def validate(spec, value, schema, where="body"):
    """A small swagger 2.0 validator: types, required, unknown properties, enums, bounds."""
    schema = resolve(spec, schema)
    t = schema.get("type", "object" if "properties" in schema else None)
    if value is None:
        return []  # an absent optional value (serde's Option)
    errors = []
    if t == "object":
        if not isinstance(value, dict):
            return [f"{where}: not an object"]
        props = schema.get("properties", {})
        for r in schema.get("required", []):
            if r not in value:
                errors.append(f"{where}: missing required {r}")
        for k, v in value.items():
            if k not in props:
                if not schema.get("additionalProperties"):
                    errors.append(f"{where}: unknown property {k}")
                continue
            errors += validate(spec, v, props[k], f"{where}.{k}")
    elif t == "array":
        if not isinstance(value, list):
            return [f"{where}: not an array"]
        for i, v in enumerate(value):
            errors += validate(spec, v, schema["items"], f"{where}[{i}]")
    elif t == "string":
        if not isinstance(value, str):
            return [f"{where}: not a string"]
        if "enum" in schema and value not in schema["enum"]:
            errors.append(f"{where}: {value!r} not in {schema['enum']}")
    elif t == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where}: not an integer"]
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: above maximum")
    elif t == "boolean":
        if not isinstance(value, bool):
            errors.append(f"{where}: not a boolean")
    return errors


def generate(spec, schema, overrides, skip=()):
    """A value with every property the schema defines."""
    schema = resolve(spec, schema)
    t = schema.get("type", "object" if "properties" in schema else None)
    if t == "object":
        out = {}
        for k, p in schema.get("properties", {}).items():
            if k in skip:
                continue
            out[k] = overrides[k] if k in overrides else generate(spec, p, overrides, skip)
        return out
    if t == "array":
        return [generate(spec, schema["items"], overrides, skip)]
    if t == "string":
        return schema["enum"][0] if "enum" in schema else "x"
    if t == "integer":
        return max(schema.get("minimum", 1), 1) if "maximum" not in schema else \
            schema.get("minimum", 1)
    if t == "boolean":
        return False
    return {}


@pytest.fixture
def env():
    root = tempfile.mkdtemp(prefix="ember-contract-", dir="/tmp")
    image = build_rootfs(os.path.join(root, "rootfs"))
    kernel = os.path.join(root, "vmlinux")
    open(kernel, "wb").write(b"not a kernel")
    for f in ("log", "metrics", "serial"):
        open(os.path.join(root, f), "w").close()
    procs = []
    yield root, image, kernel, procs
    for p in procs:
        p.stop()
    shutil.rmtree(root, ignore_errors=True)


def overrides_for(root, image, kernel, n):
    """Values that must name something real."""
    return {
        "kernel_image_path": kernel, "path_on_host": image, "initrd_path": kernel,
        "host_dev_name": f"tap{n}", "uds_path": os.path.join(root, f"v{n}.sock"),
        "log_path": os.path.join(root, "log"), "metrics_path": os.path.join(root, "metrics"),
        "serial_out_path": os.path.join(root, "serial"), "drive_id": "rootfs",
        "iface_id": "eth0", "vcpu_count": 2, "mem_size_mib": 64, "guest_cid": 3,
        "is_root_device": True, "network_interfaces": ["eth0"], "ipv4_address": "169.254.169.254",
        "guest_mac": "06:00:ac:10:00:02", "level": "Info", "module": "api_server",
        "amount_mib": 0, "huge_pages": "None", "mtu": 1500,
        # bitmaps and registers in the formats the swagger describes
        "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx1", "leaf": "0x1", "subleaf": "0x0",
        "addr": "0x10a", "register": "eax", "kvm_capabilities": ["121"],
    }


# (method, path, definition, fields to leave out because they exclude each other)
PRE_BOOT = [
    ("PUT", "/logger", "Logger", ()),
    ("PUT", "/metrics", "Metrics", ()),
    ("PUT", "/machine-config", "MachineConfiguration", ()),
    ("PATCH", "/machine-config", "MachineConfiguration", ()),
    ("PUT", "/boot-source", "BootSource", ()),
    ("PUT", "/drives/rootfs", "Drive", ("socket", "partuuid")),  # virtio-block, not vhost-user
    ("PUT", "/network-interfaces/eth0", "NetworkInterface", ()),
    ("PUT", "/vsock", "Vsock", ("vsock_id",)),
    ("PUT", "/mmds/config", "MmdsConfig", ()),
    ("PUT", "/mmds", "MmdsContentsObject", ()),
    ("PUT", "/entropy", "EntropyDevice", ()),
    ("PUT", "/serial", "SerialDevice", ()),
    ("PUT", "/balloon", "Balloon", ()),
    ("PUT", "/cpu-config", "CpuConfig", ()),
    ("PUT", "/actions", "InstanceActionInfo", ()),
]


def test_request_bodies_follow_the_swagger(env):
    root, image, kernel, procs = env
    spec = load_swagger()
    d = os.path.join(root, "vm")
    os.makedirs(d)
    f = Fcsim(d)
    procs.append(f)
    ov = overrides_for(root, image, kernel, 0)
    accepted = []
    for method, path, name, skip in PRE_BOOT:
        schema = {"$ref": f"#/definitions/{name}"}
        body = generate(spec, schema, ov, skip)
        if name == "InstanceActionInfo":
            body = {"action_type": "FlushMetrics"}
        status, reply = f.api.call(method, path, body)
        assert status == 204, (method, path, body, reply)
        accepted.append((name, body))
    for name, body in accepted:
        errors = validate(spec, body, {"$ref": f"#/definitions/{name}"})
        assert not errors, (name, body, errors)

    # GET answers follow the swagger's response definitions
    for path, name in (("/", "InstanceInfo"), ("/version", "FirecrackerVersion"),
                       ("/machine-config", "MachineConfiguration"),
                       ("/vm/config", "FullVmConfiguration"), ("/balloon", "Balloon")):
        status, reply = f.api.get(path)
        assert status == 200, (path, reply)
        errors = validate(spec, reply, {"$ref": f"#/definitions/{name}"})
        assert not errors, (path, reply, errors)


def test_required_and_unknown_fields_are_refused(env):
    root, image, kernel, procs = env
    spec = load_swagger()
    d = os.path.join(root, "vm")
    os.makedirs(d)
    f = Fcsim(d)
    procs.append(f)
    ov = overrides_for(root, image, kernel, 1)
    endpoints = PRE_BOOT + [("PUT", "/snapshot/create", "SnapshotCreateParams", ()),
                            ("PUT", "/snapshot/load", "SnapshotLoadParams",
                             ("mem_file_path",)),
                            ("PATCH", "/vm", "Vm", ())]
    checked = 0
    for method, path, name, skip in endpoints:
        schema = resolve(spec, {"$ref": f"#/definitions/{name}"})
        body = generate(spec, schema, ov, skip)
        for field in schema.get("required", []):
            partial = copy.deepcopy(body)
            del partial[field]
            status, reply = f.api.call(method, path, partial)
            assert status == 400, (method, path, field)
            assert field in reply["fault_message"], (method, path, field, reply)
            checked += 1
        if schema.get("additionalProperties"):
            continue
        extra = dict(copy.deepcopy(body), not_in_the_swagger=1)
        status, reply = f.api.call(method, path, extra)
        assert status == 400, (method, path)
        assert "not_in_the_swagger" in reply["fault_message"], reply
    assert checked >= 15


def test_post_boot_and_snapshot_bodies(env):
    root, image, kernel, procs = env
    spec = load_swagger()
    d = os.path.join(root, "vm")
    os.makedirs(d)
    shutil.copy(image, os.path.join(d, "rootfs"))
    f = Fcsim(d)
    procs.append(f)
    f.configure("rootfs", kernel, mem=16, vsock=True, boot_args="init=/sbin/init")
    f.api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    f.wait_output("guest-helper: ready")
    for body in ({"state": "Paused"},):
        assert not validate(spec, body, {"$ref": "#/definitions/Vm"})
        f.api.ok("PATCH", "/vm", body)
    create = generate(spec, {"$ref": "#/definitions/SnapshotCreateParams"},
                      {"snapshot_path": "vmstate", "mem_file_path": "mem"})
    assert not validate(spec, create, {"$ref": "#/definitions/SnapshotCreateParams"})
    f.api.ok("PUT", "/snapshot/create", create)
    f.stop()
    os.unlink(os.path.join(d, "v.sock"))
    g = Fcsim(d, sock="api2.sock")
    procs.append(g)
    load = generate(spec, {"$ref": "#/definitions/SnapshotLoadParams"},
                    {"snapshot_path": "vmstate", "backend_type": "File", "backend_path": "mem",
                     "iface_id": "eth0", "host_dev_name": "tap9", "uds_path": "v.sock"},
                    skip=("mem_file_path", "enable_diff_snapshots", "network_overrides"))
    assert not validate(spec, load, {"$ref": "#/definitions/SnapshotLoadParams"})
    g.api.ok("PUT", "/snapshot/load", load)
    assert g.api.get("/")[1]["state"] in ("Paused", "Running")
