#!/usr/bin/env python3
"""Summarizes kernels' machine code (SASS) for the flash kernel work.

  sass_summary.py SASS [--kernel REGEX] [--stalls CSV]

SASS is `cuobjdump --dump-sass` output. For each kernel whose (mangled) name
matches REGEX: its instruction count and code bytes, an opcode histogram, the
spill traffic (local loads and stores), and its loops (backward branches),
innermost first, each with its size and opcode mix: the hot loop's size is
what the instruction cache has to hold.

--stalls takes `ncu --import R --page source --print-source sass --csv` of
one of those kernels and adds where the warps waited: the sampled stall
counts per instruction (the top ones with their SASS), per opcode and per
loop (the 10 loops with the most). The column names differ between ncu versions, so the ones used are
printed first; a file without a recognizable sampling column is reported,
not guessed at.
"""
import argparse
import collections
import csv
import re
import sys

INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
BRANCH = re.compile(r"\b(BRA|BRX|JMP)\b[^;]*?0x([0-9a-f]+)")


def opcode(text):
    """The instruction's opcode without predicate and modifiers (HGMMA.64x64x16.F32 -> HGMMA)."""
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def parse(path):
    """{kernel: [(address, text)]} from cuobjdump --dump-sass output."""
    kernels, current = {}, None
    with open(path, errors="replace") as f:
        for line in f:
            m = FUNC.match(line)
            if m:
                current = kernels.setdefault(m.group(1), [])
                continue
            m = INSTR.match(line)
            if m and current is not None:
                current.append((int(m.group(1), 16), m.group(2)))
    return kernels


def loops(code):
    """Backward branches as (start, end, count) ranges of addresses, innermost (smallest) first."""
    found = set()
    for addr, text in code:
        m = BRANCH.search(text)
        if m:
            target = int(m.group(2), 16)
            if target <= addr:
                found.add((target, addr))
    ranges = []
    for start, end in found:
        count = sum(1 for a, _ in code if start <= a <= end)
        ranges.append((start, end, count))
    return sorted(ranges, key=lambda r: r[2])


def histogram(code, top):
    counts = collections.Counter(opcode(t) for _, t in code)
    return ", ".join(f"{op} {n}" for op, n in counts.most_common(top))


def summarize(name, code, top):
    print(f"== {name}")
    size = (code[-1][0] + 16 - code[0][0]) if code else 0
    print(f"instructions {len(code)}, {size} bytes")
    print(f"opcodes: {histogram(code, top)}")
    spills = [t for _, t in code if opcode(t) in ("LDL", "STL")]
    print(f"local loads/stores (spills): {len(spills)}")
    ls = loops(code)
    print(f"loops (backward branches): {len(ls)}")
    for start, end, count in ls[:20]:
        body = [(a, t) for a, t in code if start <= a <= end]
        print(f"  [{start:#06x}, {end:#06x}] {count} instructions, {16 * count} bytes: {histogram(body, 12)}")


def stall_column(header):
    """The column of all sampled stalls per instruction, by the names ncu has used."""
    for want in ("Warp Stall Sampling (All Samples)", "Warp Stall Sampling (All Cycles)", "stall_all"):
        for i, h in enumerate(header):
            if h.strip().lower() == want.lower():
                return i
    for i, h in enumerate(header):
        if "sampling" in h.lower() and "not" not in h.lower():
            return i
    return None


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def stalls(path, code, top):
    with open(path, newline="", errors="replace") as f:
        rows = [r for r in csv.reader(f) if r]
    start = next((i for i, r in enumerate(rows) if any("Address" in c for c in r)), None)
    if start is None:
        print(f"stalls: no header with an Address column in {path}; its first lines:")
        for r in rows[:5]:
            print("  ", r)
        return
    header, body = rows[start], rows[start + 1:]
    print("stalls: columns " + " | ".join(h.strip() for h in header))
    col = stall_column(header)
    addr_col = next(i for i, h in enumerate(header) if "Address" in h)
    src_col = next((i for i, h in enumerate(header) if h.strip() in ("Source", "SASS")), None)
    if col is None:
        print("stalls: no sampling column recognized; nothing summed")
        return
    samples = []
    for r in body:
        if len(r) <= max(col, addr_col):
            continue
        try:
            addr = int(r[addr_col].strip(), 16)
        except ValueError:
            continue
        text = r[src_col].strip() if src_col is not None and src_col < len(r) else ""
        samples.append((addr, number(r[col]), text))
    # ncu prints the kernel's run-time addresses; the dump's start at the kernel's first
    # instruction: rebase them so that loops can be attributed (the page lists every instruction,
    # so its lowest address is the kernel's start).
    if code and samples and not any(a == code[0][0] for a, _, _ in samples):
        base = min(a for a, _, _ in samples) - code[0][0]
        samples = [(a - base, s, t) for a, s, t in samples]
    total = sum(s for _, s, _ in samples) or 1.0
    print(f"stalls: {len(samples)} instructions, {total:.0f} samples ({header[col].strip()})")
    print(f"top {top} instructions:")
    for addr, s, text in sorted(samples, key=lambda x: -x[1])[:top]:
        print(f"  {addr:#06x} {100 * s / total:5.1f}%  {text}")
    by_op = collections.Counter()
    for _, s, text in samples:
        by_op[opcode(text)] += s
    print("by opcode: " + ", ".join(f"{op} {100 * s / total:.1f}%" for op, s in by_op.most_common(15)))
    if code:
        per_loop = [(sum(x for a, x, _ in samples if start <= a <= end), start, end, count)
                    for start, end, count in loops(code)]
        for s, start, end, count in sorted(per_loop, reverse=True)[:10]:
            print(f"  loop [{start:#06x}, {end:#06x}] ({count} instructions): {100 * s / total:.1f}% of samples")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass")
    ap.add_argument("--kernel", default=".", help="regex over mangled kernel names")
    ap.add_argument("--stalls", help="ncu --page source --print-source sass --csv of one matching kernel")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    kernels = {k: v for k, v in parse(args.sass).items() if re.search(args.kernel, k)}
    if not kernels:
        sys.exit(f"no kernel matching {args.kernel!r} in {args.sass}")
    for name, code in kernels.items():
        summarize(name, code, args.top)
    if args.stalls:
        code = next(iter(kernels.values())) if len(kernels) == 1 else []
        if len(kernels) > 1:
            print("stalls: several kernels match --kernel; loops are not attributed")
        stalls(args.stalls, code, args.top)


if __name__ == "__main__":
    main()
