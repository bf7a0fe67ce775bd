"""What the fused statistics kernel costs per element on an H100/H200, measured without a GPU.

Each variant of the Triton kernel the watch launches (fp32 / fp16 / bf16 input, sampling flag,
call index from the device or not) is compiled for sm_90 on this machine; Triton's own
``cuobjdump`` reads the registers, stack and spill bytes of the cubin, and ``nvdisasm`` its SASS.
The steady-state loop is the fast pass: of the loops that load the input (``LDG``) and branch
back to themselves, the one with the most loads (``UNROLL`` tiles per iteration). Its instructions
divided by the elements one thread handles per iteration (``GROUP`` / threads) are the
instructions per element. The other loops are the full re-read a program makes only when its
share holds NaN, Inf or a value over a cast's range, and the masked tail: reported, not budgeted.
Occupancy follows from the registers: 64K registers per SM, at most 64 warps.

The budget follows from the machine (issue 15): an H200 issues ~3.3e13 thread-instructions/s and
reads ~1.6e12 two-byte elements/s at 75% of its copy bandwidth, so a kernel at the bandwidth limit
spends at most ~20 instructions per element on fp16/bf16 and ~40 on fp32.

Usage:
    python benchmarks/kernel_static.py            # a table
    python benchmarks/kernel_static.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from torchwatch.kernels import triton_stats

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
BUDGET = {"fp32": 40, "fp16": 20, "bf16": 20}  # SASS instructions per element
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def resources(cubin: str) -> dict[str, int]:
    """Registers, stack, local memory of the kernel (``cuobjdump --dump-resource-usage``)."""
    out = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", cubin], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    found = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", out)}
    return {"registers": found.get("reg", -1), "stack": found.get("stack", 0), "local": found.get("local", 0)}


def loops(cubin: str) -> list[tuple[int, dict[str, int]]]:
    """Each loop that loads global memory, in code order: (instructions, count by opcode)."""
    sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], check=True, capture_output=True,
                          text=True).stdout  # fmt: skip
    code: list[tuple[int, str, str]] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        found = _INSTRUCTION.search(line)
        if found:
            address = int(found.group(1), 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            code.append((address, found.group(3), found.group(4)))
    found_loops = []
    for address, op, rest in code:
        target = labels.get(m.group(1)) if op.startswith("BRA") and (m := re.search(r"(\.L_x_\d+)", rest)) else None
        if target is not None and target <= address:
            body = [o for a, o, _ in code if target <= a <= address and not o.startswith("NOP")]
            if any(o.startswith("LDG") for o in body):
                by_op: dict[str, int] = {}
                for o in body:
                    by_op[o.split(".")[0]] = by_op.get(o.split(".")[0], 0) + 1
                found_loops.append((len(body), dict(sorted(by_op.items(), key=lambda kv: -kv[1]))))
    if not found_loops:
        raise RuntimeError("no loop that loads global memory found in the SASS")
    return found_loops


def occupancy(registers: int, warps: int) -> int:
    """Resident warps per SM on sm_90 for this register count (256-register allocation granules)."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(65536 // (per_warp * warps), 64 // warps, 32)
    return blocks * warps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--capability", type=int, default=90, help="compute capability to compile for (default 90)")
    args = p.parse_args()
    per_thread = triton_stats.GROUP // (32 * triton_stats.NUM_WARPS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in triton_stats.variants():
            compiled = triton.compile(source, target=GPUTarget("cuda", args.capability, 32),
                                      options={"num_warps": triton_stats.NUM_WARPS})  # fmt: skip
            path = os.path.join(tmp, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            found = loops(path)
            count, by_op = max(found, key=lambda loop: loop[1].get("LDG", 0))  # the fast pass
            others = [n for n, ops in found if (n, ops) != (count, by_op)]  # the re-read, the tail
            dtype = name.split("/")[0]
            usage = resources(path)
            warps = occupancy(usage["registers"], triton_stats.NUM_WARPS)
            rows.append({"variant": name, **usage, "warps_per_sm": warps,
                         "loop_instructions": count, "loads_per_iteration": by_op.get("LDG", 0),
                         "elements_per_thread": per_thread, "per_element": count / per_thread,
                         "other_loops_per_element": [n / (per_thread / triton_stats.UNROLL) for n in others],
                         "budget": BUDGET[dtype], "top_ops": dict(list(by_op.items())[:8])})  # fmt: skip
    for r in rows:
        spill = r["stack"] + r["local"]
        print(f"{r['variant']:<32} regs {r['registers']:>4} ({r['warps_per_sm']} warps/SM)  spill {spill:>3} B  "
              f"loop {r['loop_instructions']:>4} "
              f"instr / {r['elements_per_thread']} el = {r['per_element']:5.1f} per element (budget {r['budget']}; "
              f"re-read/tail loops {', '.join(f'{v:.0f}' for v in r['other_loops_per_element'])})  "
              f"{r['top_ops']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"capability": args.capability, "variants": rows}, f, indent=2)


if __name__ == "__main__":
    main()
