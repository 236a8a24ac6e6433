"""The collectives of a compiled program, counted as they execute: parsed from its optimised HLO text.

Each all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute is listed with how often it
runs per call (an op inside a `while` body — lax.scan / lax.map over chunks or loss blocks — counts
trip-count times) and its logical (unsharded) bytes: an all-reduce moves its result, an all-gather its
gathered result, a reduce-scatter its input (= result x group size).

    collectives = parse_collectives(jitted.lower(*args).compile().as_text(), num_devices=8)
    total_bytes(collectives, "all-reduce")
"""

from __future__ import annotations

import collections
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "s8": 1,
               "u8": 1, "pred": 1, "s64": 8, "u64": 8}
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_OP = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*?) (" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OPNAME = re.compile(r'op_name="([^"]*)"')


def _array_bytes(shape_text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in DTYPE_BYTES:
            out.append(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
    return out


def _group_size(line: str, num_devices: int) -> int:
    """Participants per replica group, from any of the three printed forms."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = {k.strip("'"): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        return math.prod(sizes[a.strip().strip("'")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if m:
        return int(m.group(2))
    return num_devices


def parse_collectives(hlo: str, num_devices: int) -> list[dict]:
    """Every collective of an optimised HLO module with its execution count per step and logical bytes."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            m = _HEADER.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
        if current is not None and line.startswith(" "):
            comps[current].append(line)
    # Executions per step of every computation: entry once; a while body trip-count times per execution.
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            trip = 1
            if " while(" in line:
                t = _TRIP.search(line)
                trip = int(t.group(1)) if t else -1
            for callee in _CALLEE.findall(line):
                calls[name].append((callee, trip if f"body=%{callee}" in line or f"body={callee}" in line else 1))
            for group in _BRANCHES.findall(line):
                for callee in group.split(","):
                    calls[name].append((callee.strip().lstrip("%"), 1))
    mult: dict[str, float] = collections.defaultdict(float)

    def visit(name: str, times: float, depth: int = 0):
        if depth > 64:
            return
        mult[name] += times
        for callee, trip in calls.get(name, ()):
            visit(callee, times * (trip if trip > 0 else float("nan")), depth + 1)
    visit(entry, 1.0)

    found = []
    for name, lines in comps.items():
        for line in lines:
            m = _OP.match(line)
            if not m or mult.get(name, 0) == 0:
                continue
            op, shape, kind, start = m.group(1), m.group(2), m.group(3), m.group(4)
            sizes = _array_bytes(shape)
            if start and kind in ("all-gather", "collective-permute") and len(sizes) > 1:
                sizes = sizes[len(sizes) // 2:]  # async start: (operands, results)
            nbytes = sum(sizes)
            group = _group_size(line, num_devices)
            if kind == "reduce-scatter":
                nbytes *= group
            where = _OPNAME.search(line)
            found.append({"op": op, "kind": kind, "count": mult[name], "bytes": nbytes, "group": group,
                          "shape": shape[:80], "op_name": where.group(1) if where else ""})
    return found


def total_bytes(collectives: list[dict], kind: str) -> float:
    """Bytes of every `kind` collective per call, executions counted."""
    return sum(c["count"] * c["bytes"] for c in collectives if c["kind"] == kind)
