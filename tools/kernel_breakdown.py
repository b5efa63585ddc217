#!/usr/bin/env python3
"""Kernel time per iteration of a loom-bench row, from an ncu CSV.

  ncu --metrics gpu__time_duration.sum --csv --launch-skip 40 --launch-count 400 \\
      build/loom-bench --families mixer --reps 10 --rows moh > moh.csv
  python3 tools/kernel_breakdown.py moh.csv [marker]

One iteration is the span between two launches of the marker kernel (a
substring of its name; default: cuDNN's attention forward, 'fprop'), taken
from the end of the capture (warm); kernels are grouped by name without
template arguments' tails and sorted by time.
"""
import collections
import csv
import re
import sys


def main():
    path = sys.argv[1]
    marker = sys.argv[2] if len(sys.argv) > 2 else 'fprop'
    rows = list(csv.DictReader(line for line in open(path) if line.startswith('"')))
    if not rows:
        sys.exit(f'{path}: no ncu CSV rows')
    names = [r['Kernel Name'] for r in rows]
    times = [float(r['Metric Value'].replace(',', '')) for r in rows]
    unit = rows[0]['Metric Unit']
    at = [i for i, n in enumerate(names) if marker in n]
    if len(at) < 3:
        sys.exit(f'{path}: fewer than three launches of a kernel named like "{marker}": capture more launches')
    a, b = at[-3], at[-2]
    groups = collections.OrderedDict()
    for n, t in zip(names[a:b], times[a:b]):
        key = re.sub(r'\(.*', '', n)
        key = re.sub(r'void |cuda::<unnamed>::|cuda_rt::<unnamed>::|detail::<unnamed>::', '', key)[:80]
        g = groups.setdefault(key, [0.0, 0])
        g[0] += t
        g[1] += 1
    scale = {'ns': 1e-3, 'usecond': 1.0, 'us': 1.0, 'msecond': 1e3, 'ms': 1e3}.get(unit, 1e-3)
    total = sum(times[a:b]) * scale
    print(f'{path}: {b - a} kernels per iteration, {total / 1e3:.3f} ms')
    for key, (t, c) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f'  {t * scale:9.1f} us  x{c:3d}  {key}')


if __name__ == '__main__':
    main()
