#!/usr/bin/env python3
"""Times the shapes of loom-bench with PyTorch on the same card and prints the ratios.

    build-gpu/loom-bench --json /tmp/loom.json
    python3 tools/bench_torch.py /tmp/loom.json

Each loom row (family, name, shape, ms) that has a PyTorch counterpart is timed
here the same way (CUDA events, median of --reps after 3 warm-ups) and printed
as: loom ms, torch ms, and torch/loom (above 1: loom is faster). Counterparts:
torch.matmul (GEMMs), torch.add / mul / copy_ / sum, F.rms_norm, F.silu * up
(eager SwiGLU), torch.softmax, F.cross_entropy (forward, backward through
autograd), torch.optim.AdamW(fused=True) (fp32 params; it writes no bf16 copy,
so it moves 28 bytes per parameter where loom moves 30), torch._foreach_norm.
Attention rows (dense, causal) are timed with F.scaled_dot_product_attention
twice, pinned to its flash backend and to its cuDNN backend (is_causal=True,
B 1, H 16, D 128, bf16; fwd+bwd through autograd), and printed with both
ratios; S2 rows and the gated rows (attention with loom's sigmoid gate or MoH's head weights
in its epilogue) have no PyTorch counterpart.
Rows without a counterpart (RoPE, embedding) are listed with loom's time only.
"""
import argparse
import json
import re
import sys

import torch
import torch.nn.functional as F


def time_ms(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def dims(shape):
    return [int(v) for v in re.findall(r"\d+", shape)]


def empty(*shape, dtype=torch.bfloat16, value=0.5):
    return torch.full(shape, value, dtype=dtype, device="cuda")


MODELS = {  # name: (tokens, d, heads, kv_heads, head_dim, ffn, vocab), as in launch/bench.cpp
    "recipe": (8 * 128, 128, 4, 2, 32, 384, 256),
    "1.3B": (16384, 2048, 16, 16, 128, 5632, 32000),
}


def parameter_shapes(model, layers=4):
    tokens, d, heads, kv, hd, ffn, vocab = MODELS[model]
    qkv = (heads + 2 * kv) * hd
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(qkv, d), (d, heads * hd), (ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return shapes + [(d,)]


def attention_counterparts(row):
    """{backend: closure} timing SDPA at the row's shape, pinned to each backend; {} for S2 and gated rows."""
    if "s2" in row["name"] or "gate" in row["name"] or "moh weights" in row["name"]:
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b, t, h, d = dims(row["shape"])[:4]
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.bfloat16, device="cuda", requires_grad=True) for _ in range(3))
    dout = torch.randn(b, h, t, d, dtype=torch.bfloat16, device="cuda")
    out = {}
    for label, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
        def fwd(backend=backend):
            with sdpa_kernel(backend), torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwd_bwd(backend=backend):
            with sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                torch.autograd.grad(o, (q, k, v), dout)
        out[label] = fwd_bwd if row["name"].endswith("fwd+bwd") else fwd
    return out


def counterpart(row):
    """A closure timing PyTorch's version of the loom row, or None."""
    family, name, shape = row["family"], row["name"], row["shape"]
    model = name.split(" ")[0]
    d = dims(shape)
    if family == "gemm":
        if name == "square bf16":
            a = empty(d[0], d[0], value=0.01)
            return lambda: torch.matmul(a, a)
        n, k, o = d
        x, w, y = empty(n, k, value=0.01), empty(o, k, value=0.01), empty(n, o, value=0.01)
        if name.endswith(" fwd"):
            return lambda: torch.matmul(x, w.t())
        if name.endswith(" dx"):
            return lambda: torch.matmul(y, w)
        return lambda: torch.matmul(y.t(), x)
    if family == "elementwise":
        n, c = d
        x, y, out = empty(n, c), empty(n, c, value=0.25), empty(n, c)
        if "add" in name and "axpy" not in name:
            return lambda: torch.add(x, y, out=out)
        if "cast" in name:
            x32 = empty(n, c, dtype=torch.float32)
            return lambda: out.copy_(x32)
        if "row" in name:
            row = empty(1, c, value=2.0)
            return lambda: torch.mul(x, row, out=out)
        if "axpy" in name:
            g32 = empty(n, c, dtype=torch.float32, value=0.0)
            return lambda: g32.add_(x, alpha=0.5)
    if family == "reduce":
        n, c = d
        x = empty(n, c)
        if "sum_dim" in name:
            return lambda: x.sum(0, dtype=torch.float32)
        return lambda: x.sum(dtype=torch.float32)
    if family == "rmsnorm" and name.endswith("forward"):
        n, c = d
        x, w = empty(n, c), empty(c, value=1.0)
        return lambda: F.rms_norm(x, (c,), w, 1e-5)
    if family == "activation":
        n, f = d
        g, u = empty(n, f), empty(n, f)
        if "swiglu forward" in name:
            return lambda: F.silu(g) * u
        if "silu forward" in name:
            return lambda: F.silu(g)
    if family == "softmax" and name.endswith("forward"):
        x = empty(*d)
        return lambda: torch.softmax(x, -1)
    if family == "cross_entropy":
        rows, vocab = d
        logits = empty(rows, vocab).requires_grad_(True)
        targets = (torch.arange(rows, device="cuda") * 31) % vocab
        if "forward" in name:
            def fwd():
                with torch.no_grad():
                    F.cross_entropy(logits, targets)
            return fwd
        loss = F.cross_entropy(logits, targets)
        return lambda: torch.autograd.grad(loss, logits, retain_graph=True)
    if family == "optimizer":
        shapes = parameter_shapes(model)
        params = [torch.full(s, 0.01, device="cuda", requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        if "adamw" in name:
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            return opt.step
        grads = [p.grad for p in params]
        return lambda: torch._foreach_norm(grads)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loom_json", help="output of loom-bench --json")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_torch: no GPU visible to PyTorch; nothing to time.")
        return 0
    with open(args.loom_json) as f:
        data = json.load(f)
    print(f"bench_torch: {torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"loom copy bandwidth {data['copy_gbps']:.1f} GB/s")
    family = None
    for row in data["rows"]:
        if row["family"] == "attention":
            if row["family"] != family:
                family = row["family"]
                print(f"\n== {family} (TFLOP/s: causal pairs, forward 4 D per pair, fwd+bwd 3.5x forward) ==")
                print(f"{'kernel':<22} {'shape':<28} {'loom ms':>9} {'TFLOP/s':>8} {'flash ms':>9} "
                      f"{'flash/loom':>10} {'cudnn ms':>9} {'cudnn/loom':>10}")
            cells = []
            for label, fn in attention_counterparts(row).items():
                try:
                    ms = time_ms(fn, args.reps)
                    cells += [f"{ms:9.3f}", f"{ms / row['ms']:10.2f}"]
                except RuntimeError as e:  # a backend that does not take the shape on this card
                    print(f"  ({label}: {str(e).splitlines()[0]})")
                    cells += [f"{'-':>9}", f"{'-':>10}"]
            tflops = row["flops"] / (row["ms"] * 1e-3) / 1e12
            print(f"{row['name']:<22} {row['shape']:<28} {row['ms']:9.3f} {tflops:8.1f} " + " ".join(cells))
            torch.cuda.empty_cache()
            continue
        if row["family"] != family:
            family = row["family"]
            print(f"\n== {family} ==")
            print(f"{'kernel':<36} {'shape':<30} {'loom ms':>10} {'torch ms':>10} {'torch/loom':>11}")
        fn = counterpart(row)
        torch_ms = time_ms(fn, args.reps) if fn is not None else None
        ratio = f"{torch_ms / row['ms']:11.2f}" if torch_ms else f"{'-':>11}"
        torch_text = f"{torch_ms:10.4f}" if torch_ms else f"{'-':>10}"
        print(f"{row['name']:<36} {row['shape']:<30} {row['ms']:10.4f} {torch_text} {ratio}")
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
