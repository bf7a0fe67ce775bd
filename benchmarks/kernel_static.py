"""What the fused statistics kernel costs per element on an H100/H200, measured without a GPU.

Each variant of the Triton kernel the watch launches (fp32 / fp16 / bf16 input, sampling flag,
call index from the device or not) is compiled for sm_90 on this machine; Triton's own
``cuobjdump`` reads the registers, stack and spill bytes of the cubin, and ``nvdisasm`` its SASS.
The steady-state loop is the fast pass: of the loops that load the input (``LDG``) and branch
back to themselves, the one with the most loads (``UNROLL`` tiles per iteration). Its instructions
divided by the elements one thread handles per iteration (``group(dtype)`` / threads) are the
instructions per element. The other loops are the full re-read a program makes only when its
share holds NaN, Inf or a value over a cast's range, and the masked tail: reported, not budgeted.
Occupancy follows from the registers: 64K registers per SM, at most 64 warps.

The budget follows from the machine (issue 15): an H200 issues ~3.3e13 thread-instructions/s and
reads ~1.6e12 two-byte elements/s at 75% of its copy bandwidth, so a kernel at the bandwidth limit
spends at most ~20 instructions per element on fp16/bf16 and ~40 on fp32.

Bytes in flight per SM (issue 25): each resident warp's 32 threads x the bytes one iteration of
the loop loads (read from the SASS: the width of each ``LDG``), and, lower, what is outstanding
when the loop first reads a loaded register (the compiler issues some loads later in the body to
save registers). Little's law says what HBM needs: bandwidth x latency / SMs, ~4.8 TB/s x
~0.6 us / 132 SMs ~ 22 KB per SM on an H200 (``IN_FLIGHT_GOAL``).

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

import torch
import triton
from triton.backends.compiler import GPUTarget

from torchwatch.kernels import triton_stats

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
BUDGET = {"fp32": 40, "fp16": 20, "bf16": 20}  # SASS instructions per element
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
H200_BANDWIDTH, HBM_LATENCY, H200_SMS = 4.8e12, 0.6e-6, 132  # bytes/s, s, SMs
IN_FLIGHT_GOAL = H200_BANDWIDTH * HBM_LATENCY / H200_SMS  # bytes per SM, ~21.8 KB
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def resources(cubin: str) -> dict[str, int]:
    """Registers, stack, local memory of the kernel (``cuobjdump --dump-resource-usage``)."""
    out = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", cubin], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    found = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", out)}
    return {"registers": found.get("reg", -1), "stack": found.get("stack", 0), "local": found.get("local", 0)}


def load_bytes(opcode: str) -> int:
    """Bytes one thread reads with this ``LDG`` (its width suffix; 32 bits without one)."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return size
    return 4


def _before_first_use(body: list[tuple[str, str]]) -> int:
    """Bytes the loop's loads have in flight when it first reads a loaded register: what a warp
    keeps outstanding while it waits (the compiler may issue the rest later in the body)."""
    loaded: set[str] = set()
    total = 0
    for op, operands in body:
        registers = re.findall(r"\bR(\d+)", operands)
        if op.startswith("LDG"):
            first = int(registers[0])
            loaded.update(f"R{first + i}" for i in range(max(1, load_bytes(op) // 4)))
            total += load_bytes(op)
        elif loaded:
            sources = registers if op.startswith("ST") else registers[1:]  # a store reads every operand
            if any(f"R{r}" in loaded for r in sources):
                return total
    return total


def loops(cubin: str) -> list[tuple[int, dict[str, int]]]:
    """Each loop that loads global memory, in code order: (instructions, count by opcode, with
    ``bytes`` the loads' bytes per thread)."""
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
                by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
                by_op["bytes"] = sum(load_bytes(o) for o in body if o.startswith("LDG"))
                by_op["bytes_before_use"] = _before_first_use([(o, r) for a, o, r in code if target <= a <= address])
                found_loops.append((len(body), by_op))
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
            per_thread = triton_stats.group(DTYPES[dtype]) // (32 * triton_stats.NUM_WARPS)
            per_tile = per_thread // triton_stats.unroll(DTYPES[dtype])
            usage = resources(path)
            warps = occupancy(usage["registers"], triton_stats.NUM_WARPS)
            loaded, before_use = by_op.pop("bytes"), by_op.pop("bytes_before_use")
            for _, ops in found:
                ops.pop("bytes", None), ops.pop("bytes_before_use", None)
            rows.append({"variant": name, **usage, "warps_per_sm": warps,
                         "loop_instructions": count, "loads_per_iteration": by_op.get("LDG", 0),
                         "load_bytes_per_thread": loaded, "in_flight_per_sm": warps * 32 * loaded,
                         "in_flight_at_first_use_per_sm": warps * 32 * before_use,
                         "in_flight_goal": round(IN_FLIGHT_GOAL),
                         "elements_per_thread": per_thread, "per_element": count / per_thread,
                         "other_loops_per_element": [n / per_tile for n in others],
                         "budget": BUDGET[dtype], "top_ops": dict(list(by_op.items())[:8])})  # fmt: skip
    for r in rows:
        spill = r["stack"] + r["local"]
        print(f"{r['variant']:<32} regs {r['registers']:>4} ({r['warps_per_sm']} warps/SM)  spill {spill:>3} B  "
              f"in flight {r['in_flight_per_sm'] / 1024:2.0f} KB/SM, {r['in_flight_at_first_use_per_sm'] / 1024:2.0f} "
              f"at the first use (goal {IN_FLIGHT_GOAL / 1024:.0f})  "
              f"loop {r['loop_instructions']:>4} "
              f"instr / {r['elements_per_thread']} el = {r['per_element']:5.1f} per element (budget {r['budget']}; "
              f"re-read/tail loops {', '.join(f'{v:.0f}' for v in r['other_loops_per_element'])})  "
              f"{r['top_ops']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"capability": args.capability, "variants": rows}, f, indent=2)


if __name__ == "__main__":
    main()
