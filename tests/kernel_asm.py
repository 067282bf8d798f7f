"""Reading compiled kernels: is the main loop of a kernel Hopper's (wgmma fed by TMA)?

Used by tests/compile_triton.py on every tuned bf16/fp16 candidate built for sm_90a with tensor
descriptors, on nvdisasm's SASS and on the PTX, and on the same candidates' sm_80 (mma.sync) and
pointer (cp.async) builds, which it must reject. No triton import: tests/test_triton_compile.py
checks it on short hand-written listings.

A loop is a label and a later branch back to it; the main loop is the innermost loop that issues
the kernel's MMA (in logits_fwd, the k loop inside the loop over vocabulary tiles). Triton's
software pipelining issues the TMA loads of later stages inside that loop, so a main loop fed by
TMA has a TMA load per operand in it and no pointer load.
"""
from __future__ import annotations

import re

# The two listings: labels, instructions (their opcode, after an optional predicate), branches
# (their target); then opcode prefixes of the MMA that must be there, of TMA loads, of the
# mma.sync that must not be anywhere, and of pointer loads (plain and cp.async).
SASS = {  # nvdisasm -c: "/*0870*/  @!P0 BRA `(.L_x_2) ;", labels ".L_x_2:"
    "label": re.compile(r"^\s*(\.L_x_\d+):"),
    "op": re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)"),
    "branch": re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)"),
    "mma": ("HGMMA",), "tma": ("UTMALDG",), "sync_mma": ("HMMA",), "pointer": ("LDG", "LDGSTS"),
}
PTX = {  # "\t@%p5 bra $L__BB0_2;", labels "$L__BB0_2:"
    "label": re.compile(r"^(\$L__\w+):"),
    "op": re.compile(r"^\s+(?:@!?%\w+\s+)?([a-z][\w.:]*)"),
    "branch": re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);"),
    "mma": ("wgmma.mma_async",), "tma": ("cp.async.bulk.tensor",), "sync_mma": ("mma.sync",),
    "pointer": ("ld.global", "cp.async.ca", "cp.async.cg"),
}


def loops(text: str, syntax: dict) -> list[list[str]]:
    """The opcodes of every loop body of ``text`` (SASS or PTX ``syntax``): from a label to each
    later branch back to it."""
    ops, labels, bodies = [], {}, []
    for line in text.splitlines():
        label = syntax["label"].match(line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        op = syntax["op"].match(line)
        if not op:
            continue
        ops.append(op.group(1))
        target = syntax["branch"].search(line)
        if target and target.group(1) in labels:
            bodies.append(ops[labels[target.group(1)]:])
    return bodies


def main_loop(text: str, syntax: dict) -> str | None:
    """None if the innermost loop that issues the kernel's wgmma also issues both operand loads
    by TMA and no pointer load, and the kernel has no mma.sync; else what is wrong."""
    def has(op, prefixes):
        return any(op == p or op.startswith(p + ".") for p in prefixes)

    ops = [m.group(1) for m in map(syntax["op"].match, text.splitlines()) if m]
    sync = sorted({op for op in ops if has(op, syntax["sync_mma"])})
    if sync:
        return f"mma.sync in the kernel ({sync[0]})"
    bodies = [b for b in loops(text, syntax) if any(has(op, syntax["mma"]) for op in b)]
    if not bodies:
        return f"no loop issues {syntax['mma'][0]}"
    body = min(bodies, key=len)
    tma = sum(has(op, syntax["tma"]) for op in body)
    pointer = sorted({op for op in body if has(op, syntax["pointer"])})
    if pointer:
        return f"pointer loads in the main loop ({', '.join(pointer[:2])})"
    if tma < 2:
        return f"{tma} TMA loads ({syntax['tma'][0]}) in the main loop, not one per operand"
    return None
