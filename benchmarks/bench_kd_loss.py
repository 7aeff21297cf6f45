"""Benchmark the chunked KD loss against the plain full-logit reference: speed and peak memory.

Each (case, variant) runs in a fresh subprocess so that peak memory is its own: on CPU the peak is
ru_maxrss (the process high-water mark) minus ru_maxrss right after the inputs are allocated; on CUDA it is
torch.cuda.max_memory_allocated minus the memory allocated after the inputs. One timed step is forward +
backward (grads wrt student hidden states and head) of KL(teacher || student) at T=1.

    python benchmarks/bench_kd_loss.py --out kd_bench.json
    python benchmarks/bench_kd_loss.py --cases 128k --chunk-tokens 128 256 512 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

# name: (vocab, student hidden, teacher hidden, batch, seq)
CASES = {
    "smollm2": (49152, 384, 576, 4, 256),
    "128k": (131072, 512, 512, 2, 512),
}


def _peak_bytes_since(baseline: int, device: str) -> int:
    """Peak memory above `baseline` (bytes): ru_maxrss on CPU (KiB on Linux), allocator peak on CUDA."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() - baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline


def worker(args: argparse.Namespace) -> dict:
    """Run one variant of one case in this process; return its timings and peak memory."""
    import torch

    from compactlm.distill.losses import kd_loss, kd_loss_reference

    vocab, h_s_dim, h_t_dim, batch, seq = CASES[args.case]
    dtype, device = getattr(torch, args.dtype), args.device
    torch.manual_seed(0)
    n = batch * seq
    h_s = torch.randn(n, h_s_dim, dtype=dtype, device=device).requires_grad_()
    w_s = (torch.randn(vocab, h_s_dim, dtype=dtype, device=device) * h_s_dim**-0.5).requires_grad_()
    h_t = torch.randn(n, h_t_dim, dtype=dtype, device=device)
    w_t = torch.randn(vocab, h_t_dim, dtype=dtype, device=device) * h_t_dim**-0.5
    mask = torch.ones(batch, seq, dtype=torch.long, device=device).reshape(-1)

    def step() -> float:
        if args.variant == "reference":
            s = h_s @ w_s.T  # (N, V)
            with torch.no_grad():
                t = h_t @ w_t.T  # (N, V)
            loss = kd_loss_reference(s, t, mask)
        else:
            loss = kd_loss(h_s, w_s, h_t, w_t, mask, chunk_tokens=int(args.variant.split("-")[1]))
        torch.autograd.grad(loss, (h_s, w_s))
        return float(loss)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, loss = [], 0.0
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"case": args.case, "variant": args.variant, "tokens": n, "vocab": vocab, "loss": loss,
            "times_s": times, "median_s": median, "tokens_per_s": n / median,
            "peak_bytes": _peak_bytes_since(baseline, device), "threads": torch.get_num_threads(),
            "dtype": args.dtype, "device": device}


def _run_variant(args: argparse.Namespace, case: str, variant: str) -> dict:
    """Spawn a fresh interpreter for one (case, variant) and parse its JSON line."""
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--variant", variant, "--repeats",
           str(args.repeats), "--warmup", str(args.warmup), "--dtype", args.dtype, "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{case}/{variant} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--chunk-tokens", nargs="+", type=int, default=[256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = []
    header = f"{'case':<9}{'variant':<14}{'tokens/s':>11}{'median ms':>11}{'peak MiB':>10}{'speed x':>9}{'mem x':>8}"
    print(header)
    print("-" * len(header))
    for case in args.cases:
        ref = _run_variant(args, case, "reference")
        results = [ref] + [_run_variant(args, case, f"chunked-{c}") for c in args.chunk_tokens]
        for r in results:
            r["speed_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["peak_ratio"] = r["peak_bytes"] / max(ref["peak_bytes"], 1)
            r["loss_abs_diff"] = abs(r["loss"] - ref["loss"])
            rows.append(r)
            print(f"{case:<9}{r['variant']:<14}{r['tokens_per_s']:>11.0f}{r['median_s'] * 1e3:>11.1f}"
                  f"{r['peak_bytes'] / 2**20:>10.0f}{r['speed_ratio']:>9.2f}{r['peak_ratio']:>8.2f}")
    print("speed x = tokens/s over the reference's (>1 is faster); mem x = peak over the reference's.")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": rows, "repeats": args.repeats, "warmup": args.warmup}, f, indent=1)


if __name__ == "__main__":
    main()
