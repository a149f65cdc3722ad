"""A check on Triton IR (TTIR) that pointer base offsets computed from program ids are 64-bit.

A kernel that writes ``X + pid * stride`` in int32 wraps once ``pid * stride`` passes 2^31 (a batch index times a
batch stride over a large activation). The check follows every SSA value that depends on ``tt.get_program_id`` and
reports each scalar ``tt.addptr`` (a base pointer, not a tile of pointers) whose offset is such a value in i32.
In-tile offsets (tensor ``tt.addptr``) are left to the host-side bounds checks of each kernel's launcher.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"%[A-Za-z0-9_.$-]+")
_ASSIGN = re.compile(r"^\s*((?:%[A-Za-z0-9_.$-]+(?::\d+)?\s*,\s*)*%[A-Za-z0-9_.$-]+(?::\d+)?)\s*=\s*(.*)$")
# scalar addptr: `tt.addptr %p, %off : !tt.ptr<T>, i32` (a tensor addptr has `tensor<...>` types)
_SCALAR_ADDPTR = re.compile(
    r"tt\.addptr\s+(%[A-Za-z0-9_.$-]+)\s*,\s*(%[A-Za-z0-9_.$-]+)(?:#\d+)?\s*:\s*!tt\.ptr<[^>]*>,\s*(i\d+)"
)


def _strip(line: str) -> str:
    return re.sub(r"\bloc\(.*$", "", line)


def _defs_and_uses(line: str) -> tuple[list[str], list[str]]:
    """Names a line defines (results, loop induction variables, iter_args bindings) and the names it reads."""
    m = _ASSIGN.match(line)
    if not m:
        return [], _NAME.findall(line)
    defs = [n.split(":")[0] for n in _NAME.findall(m.group(1))]
    rhs = m.group(2)
    bound = re.findall(r"(%[A-Za-z0-9_.$-]+)\s*=", rhs)  # iter_args(%a = %x), scf.for %iv = ...
    uses = [n for n in _NAME.findall(rhs) if n not in bound]
    return defs + bound, uses


def _tainted(lines: list[str]) -> set[str]:
    """Names whose value depends on a program id (to a fixpoint: loop-carried values feed back through yields)."""
    tainted: set[str] = set()
    rows = [_defs_and_uses(line) for line in lines]
    yields = [i for i, line in enumerate(lines) if "scf.yield" in line or "scf.condition" in line]
    while True:
        before = len(tainted)
        for line, (defs, uses) in zip(lines, rows, strict=True):
            if "tt.get_program_id" in line or any(u.split("#")[0] in tainted for u in uses):
                tainted.update(defs)
        # a tainted yield taints the values its region returns: conservatively, the enclosing op's results are
        # the names defined on the nearest line above with `scf.` and a region (approximated by every scf line)
        if any(any(u.split("#")[0] in tainted for u in rows[i][1]) for i in yields):
            for line, (defs, _) in zip(lines, rows, strict=True):
                if re.search(r"scf\.(for|while|if)\b", line):
                    tainted.update(defs)
        if len(tainted) == before:
            return tainted


def narrow_base_offsets(ttir: str) -> list[str]:
    """The scalar ``tt.addptr`` lines of ``ttir`` whose offset depends on a program id and is narrower than i64."""
    lines = [_strip(line) for line in ttir.splitlines()]
    tainted = _tainted(lines)
    bad = []
    for line in lines:
        m = _SCALAR_ADDPTR.search(line)
        if m and m.group(3) != "i64" and m.group(2) in tainted:
            bad.append(line.strip())
    return bad
