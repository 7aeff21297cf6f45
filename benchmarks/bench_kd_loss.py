"""Benchmark the chunked KD loss against the plain full-logit reference: speed and peak memory.

Peak memory: each (case, variant) runs one step in a fresh subprocess; on CPU the peak is ru_maxrss (the
process high-water mark) minus ru_maxrss right after the inputs are allocated; on CUDA it is
torch.cuda.max_memory_allocated minus the memory allocated after the inputs. Speed: one subprocess per case
times all variants interleaved round by round, so drifting machine load hits them alike. One step is forward
+ backward (grads wrt student hidden states and head) of KL(teacher || student) at T=1, mask all ones.

    python benchmarks/bench_kd_loss.py          # benchmarks/results/kd_loss.json
    python benchmarks/bench_kd_loss.py --cases 128k --chunk-tokens 128 256 512 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from common import Table, write_result

from compactlm.distill.losses import kd_loss, kd_loss_reference

# name: (vocab, student hidden, teacher hidden, batch, seq)
CASES = {
    "smollm2": (49152, 384, 576, 4, 256),
    "128k": (131072, 512, 512, 2, 512),
    "gemma3": (262144, 384, 640, 2, 256),  # Gemma 3 270M's vocabulary and hidden, cut to configs/gemma3-270m.yaml's
}


def _setup(case: str, dtype_name: str, device: str) -> tuple:
    """Seeded inputs of one case: student hidden/head (grad), teacher hidden/head, mask (N,)."""
    vocab, h_s_dim, h_t_dim, batch, seq = CASES[case]
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    n = batch * seq
    h_s = torch.randn(n, h_s_dim, dtype=dtype, device=device).requires_grad_()
    # in-place scaling: no transient copy that would inflate the ru_maxrss baseline
    w_s = torch.randn(vocab, h_s_dim, dtype=dtype, device=device).mul_(h_s_dim**-0.5).requires_grad_()
    h_t = torch.randn(n, h_t_dim, dtype=dtype, device=device)
    w_t = torch.randn(vocab, h_t_dim, dtype=dtype, device=device).mul_(h_t_dim**-0.5)
    mask = torch.ones(n, dtype=torch.long, device=device)
    return h_s, w_s, h_t, w_t, mask


def _step(variant: str, h_s, w_s, h_t, w_t, mask) -> float:
    """One forward + backward (grads wrt student hidden and head); returns the loss."""
    if variant == "reference":
        s = h_s @ w_s.T  # (N, V)
        with torch.no_grad():
            t = h_t @ w_t.T  # (N, V)
        loss = kd_loss_reference(s, t, mask)
    else:
        loss = kd_loss(h_s, w_s, h_t, w_t, mask, chunk_tokens=int(variant.split("-")[1]))
    torch.autograd.grad(loss, (h_s, w_s))
    return float(loss)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def worker_memory(args: argparse.Namespace) -> dict:
    """Peak memory of one variant in this fresh process, above the memory held after allocating inputs."""
    inputs = _setup(args.case, args.dtype, args.device)
    _sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    loss = _step(args.variant, *inputs)
    _sync(args.device)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"variant": args.variant, "peak_bytes": peak, "loss": loss}


def worker_time(args: argparse.Namespace) -> dict:
    """Time all variants of one case interleaved round by round (fair under drifting machine load)."""
    inputs = _setup(args.case, args.dtype, args.device)
    variants = args.variant.split(",")
    out = {v: {"wall_s": [], "cpu_s": []} for v in variants}
    for i in range(args.warmup + args.repeats):
        for v in variants:
            _sync(args.device)
            wall, cpu = time.perf_counter(), time.process_time()
            out[v]["loss"] = _step(v, *inputs)
            _sync(args.device)
            if i >= args.warmup:
                out[v]["wall_s"].append(time.perf_counter() - wall)
                out[v]["cpu_s"].append(time.process_time() - cpu)
    return {"results": out, "threads": torch.get_num_threads()}


def _spawn(args: argparse.Namespace, mode: str, case: str, variant: str) -> dict:
    """Run a worker in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, __file__, mode, "--case", case, "--variant", variant, "--repeats",
           str(args.repeats), "--warmup", str(args.warmup), "--dtype", args.dtype, "--device", args.device,
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{case}/{variant} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_case(args: argparse.Namespace, case: str) -> list[dict]:
    """Timing (one process, interleaved) and peak memory (one fresh process per variant) of one case."""
    vocab, _, _, batch, seq = CASES[case]
    variants = ["reference"] + [f"chunked-{c}" for c in args.chunk_tokens]
    timing = _spawn(args, "--worker-time", case, ",".join(variants))
    rows = []
    for v in variants:
        t = timing["results"][v]
        mem = _spawn(args, "--worker-memory", case, v)
        rows.append({
            "case": case, "variant": v, "vocab": vocab, "tokens": batch * seq, "loss": t["loss"],
            "wall_s": t["wall_s"], "cpu_s": t["cpu_s"], "median_wall_s": statistics.median(t["wall_s"]),
            "min_wall_s": min(t["wall_s"]), "median_cpu_s": statistics.median(t["cpu_s"]),
            "peak_bytes": mem["peak_bytes"], "threads": timing["threads"],
        })
    ref = rows[0]
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["median_wall_s"]
        r["speed_ratio"] = ref["median_wall_s"] / r["median_wall_s"]
        r["speed_ratio_min"] = ref["min_wall_s"] / r["min_wall_s"]
        r["speed_ratio_cpu"] = ref["median_cpu_s"] / r["median_cpu_s"]
        r["peak_ratio"] = r["peak_bytes"] / max(ref["peak_bytes"], 1)
        r["loss_abs_diff"] = abs(r["loss"] - ref["loss"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--chunk-tokens", nargs="+", type=int, default=[256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/kd_loss.json")
    parser.add_argument("--worker-time", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_time or args.worker_memory:
        print(json.dumps(worker_time(args) if args.worker_time else worker_memory(args)))
        return

    load = os.getloadavg()[0]
    header = (f"{'case':<9}{'variant':<14}{'tokens/s':>10}{'med ms':>9}{'min ms':>9}{'cpu ms':>9}"
              f"{'peak MiB':>10}{'speed x':>9}{'(min)':>7}{'(cpu)':>7}{'mem x':>7}")
    print(header)
    print("-" * len(header))
    rows = []
    for case in args.cases:
        for r in run_case(args, case):
            rows.append(r)
            print(f"{case:<9}{r['variant']:<14}{r['tokens_per_s']:>10.0f}{r['median_wall_s'] * 1e3:>9.0f}"
                  f"{r['min_wall_s'] * 1e3:>9.0f}{r['median_cpu_s'] * 1e3:>9.0f}"
                  f"{r['peak_bytes'] / 2**20:>10.0f}{r['speed_ratio']:>9.2f}{r['speed_ratio_min']:>7.2f}"
                  f"{r['speed_ratio_cpu']:>7.2f}{r['peak_ratio']:>7.2f}")
    print("speed x = reference time / variant time (>1: faster): median wall, min wall, median CPU time;")
    print(f"mem x = peak over the reference's peak. 1-min load average at start: {load:.1f}")
    write_result("kd_loss", figures={"results": rows, "repeats": args.repeats, "warmup": args.warmup,
                                      "load_avg_1min": load}, tables={"ratios": ratios_table(rows)}, out=args.out)


def ratios_table(rows: list[dict]) -> Table:
    """Each chunked variant against the full-logits reference of its case: speed (median wall) and peak memory."""
    table = Table(["benchmark", "compactlm", "plain reference", "ratio"])
    for r in rows:
        if r["variant"] != "reference":
            table.add(f"KD loss, {r['case']} ({r['vocab']:,} vocabulary), forward + backward",
                      f"chunked, {r['variant'].removeprefix('chunked-')} tokens per chunk", "full logits + `F.kl_div`",
                      f"{r['speed_ratio']:.2f}x faster, {r['peak_ratio']:.2f}x peak memory")
    return table


if __name__ == "__main__":
    main()
