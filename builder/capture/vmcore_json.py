"""vmcore.json: the one record every writer leaves beside a dump, defined once.

Writers: the Python capture stage (capture.stage in the image), the init's static capture and
its ssh target (kdump_json in modules.d/capture/capture-lib.sh.j2) and `recover-raw`
(kdump_mkinitrd.dumps.rawrecovery). Their output is tested against FIELDS, and the man page
(kdump-mkinitrd(8), section VMCORE.JSON) lists the same fields.

The Python stage packs this module into the capture image: it may import nothing.
"""

from __future__ import annotations

SCHEMA = 1
TOOL = "kdump-mkinitrd"
STAGES = ("python", "static")
COLLECTORS = ("makedumpfile", "native", "dd")
FORMATS = ("kdump-compressed", "kdump-compressed-flattened", "elf")

# name: (JSON types allowed, required). bool is a JSON type of its own, never a number here.
FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "tool": (("string",), True),  # always "kdump-mkinitrd": keep prunes only what has it
    "schema": (("integer",), True),  # SCHEMA
    "stage": (("string",), True),  # one of STAGES: which capture wrote the dump
    "complete": (("boolean",), True),  # false only from recover-raw of a dump that never ended
    "collector": (("string",), True),  # one of COLLECTORS
    "format": (("string",), True),  # one of FORMATS
    "dump_level": (("integer",), True),  # makedumpfile -d; 1 for native (zero pages left out)
    "kernel_release": (("string",), True),
    "hostname": (("string",), True),  # capture.hostname, which names the dump directory
    "target": (("string",), True),  # the target's name in logs
    "vmcore_size": (("integer",), True),  # bytes of the file as saved
    "sha256": (("string",), True),  # of the file as saved, 64 lowercase hex digits
    "crash_time": (("integer", "null"), True),  # VMCOREINFO's CRASHTIME, null if absent
    "uptime_start": (("number",), False),  # static: capture kernel uptime, seconds
    "uptime_end": (("number",), False),
    "timings": (("object",), False),  # python: seconds per step
    "dmesg_lines": (("integer",), False),  # python: lines in vmcore-dmesg.txt
    "dmesg_error": (("string",), False),  # python: why there is no vmcore-dmesg.txt
    "collector_error": (("string",), False),  # python: why makedumpfile's dump was not kept
    "pages_total": (("integer",), False),  # native collector
    "pages_zero_skipped": (("integer",), False),
    "recovered_from": (("string",), False),  # recover-raw: the raw device read
}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def problems(record: object) -> list[str]:
    """What is wrong with a parsed vmcore.json; an empty list when it fits the schema."""
    if not isinstance(record, dict):
        return [f"not an object but {_json_type(record)}"]
    found = []
    for name, (types, required) in FIELDS.items():
        if name not in record:
            if required:
                found.append(f"{name}: missing")
            continue
        kind = _json_type(record[name])
        allowed = (*types, "integer") if "number" in types else types
        if kind not in allowed:
            found.append(f"{name}: {kind}, expected {' or '.join(types)}")
    found += [f"{name}: not in the schema" for name in record if name not in FIELDS]
    choices = {"tool": (TOOL,), "schema": (SCHEMA,), "stage": STAGES,
               "collector": COLLECTORS, "format": FORMATS}  # fmt: skip
    for name, allowed_values in choices.items():
        if name in record and record[name] not in allowed_values:
            found.append(f"{name}: {record[name]!r}, expected one of {allowed_values}")
    digest = record.get("sha256")
    if isinstance(digest, str) and (len(digest) != 64 or digest.strip("0123456789abcdef") != ""):
        found.append(f"sha256: {digest!r} is not 64 lowercase hex digits")
    for name in ("vmcore_size", "dump_level"):
        value = record.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            found.append(f"{name}: {value} is negative")
    return found


def base_record(stage: str, hostname: str, target: str) -> dict[str, object]:
    """The fields that say who wrote the record, in the order every writer uses."""
    return {"tool": TOOL, "schema": SCHEMA, "stage": stage, "complete": True,
            "hostname": hostname, "target": target}  # fmt: skip
