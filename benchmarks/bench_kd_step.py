"""Benchmark a whole KD training step: compactlm's real step against a plain full-logit reference step.

Both variants take the same batches and the same AdamW (same parameter groups, LR, clipping):

- reference: teacher(ids).logits under no_grad, student(ids).logits, F.kl_div of the two log-softmaxes over
  the full (B, S, V) logits, backward, clip, step;
- compactlm: `compactlm.distill.loop.train_step` (teacher and student final hidden states, chunked KD loss
  from the lm_head weights, `--chunk-tokens` tokens at a time).

Cases: (a) SmolLM2-135M teaching a randomly-scored pruned student (hidden 384, heads 6, ffn 1024);
(b) small random Llamas with a 128K vocabulary. Each (case, variant) runs in a fresh subprocess. Peak memory
is measured above the loaded models and the initialised optimizer state: on CPU the kernel's RSS high-water
mark is reset (/proc/self/clear_refs) after loading and read back (VmHWM) after the steps, falling back to a
ru_maxrss delta elsewhere; on CUDA it is torch.cuda.max_memory_allocated above the allocated baseline.
The FLOP rate of a step is (6 * N_student + 2 * N_teacher) * tokens / step time, against this machine's
float32 torch.mm rate.

    python benchmarks/bench_kd_step.py          # benchmarks/results/kd_step.json
    python benchmarks/bench_kd_step.py --cases 128k --steps 5 --chunk-tokens 128 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Table, peak, readme_cut, reset_peak, write_result

CASES = {  # name: (batch, seq) of one step
    "smollm2": (2, 256),
    "128k": (2, 256),
}


# ---------------------------------------------------------------- models (built once, in the parent)

def prepare(case: str, work: Path) -> dict[str, str]:
    """Save the case's teacher and student under `work` (once); their load specs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher_dir, student_dir = work / f"{case}-teacher", work / f"{case}-student"
    if case == "smollm2":
        if not (student_dir / "config.json").is_file():
            _pruned_smollm2(student_dir)
        return {"teacher": "smollm2-135m", "student": str(student_dir)}
    for path, hidden, heads, ffn, seed in ((teacher_dir, 512, 8, 1536, 0), (student_dir, 256, 4, 768, 1)):
        if not (path / "config.json").is_file():
            torch.manual_seed(seed)
            config = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                                 num_key_value_heads=heads // 2, head_dim=64, num_hidden_layers=2,
                                 vocab_size=131072, max_position_embeddings=4096, tie_word_embeddings=False)
            LlamaForCausalLM(config).save_pretrained(path)
    return {"teacher": str(teacher_dir), "student": str(student_dir)}


def _pruned_smollm2(out: Path) -> None:
    """SmolLM2-135M cut to the README's shape with random scores (speed, not quality)."""
    from compactlm.pruning import prune_model

    model, plan = readme_cut()
    prune_model(model, plan).save_pretrained(out)


# ---------------------------------------------------------------- one variant in this process

def _init_optimizer_state(optimizer) -> None:
    """Allocate AdamW's state with an lr=0 step on zero grads (weights unchanged): part of the baseline."""
    import torch

    groups = optimizer.param_groups
    lrs = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def worker(args: argparse.Namespace) -> dict:
    """Time `args.steps` training steps of one variant of one case; peak memory above the loaded state."""
    import torch
    import torch.nn.functional as F

    from compactlm.config import DistillConfig
    from compactlm.distill.distributed import Dist
    from compactlm.distill.loop import build, make_optimizer, train_step
    from compactlm.distill.trainee import Objective, Trainee
    from compactlm.models.loading import load_model
    from compactlm.models.params import num_params

    device = args.device
    d = Dist(0, 1, torch.device(device))
    teacher, student = load_model(args.teacher, device=device), load_model(args.student, device=device)
    n_teacher, n_student = num_params(teacher), num_params(student)
    batch, seq = CASES[args.case]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, student.config.vocab_size, (batch, seq), generator=g)
               for _ in range(args.warmup + args.steps)]
    chunk = args.chunk_tokens[0] if args.variant != "reference" else None
    tc = DistillConfig(batch_size=batch, seq_len=seq, chunk_tokens=chunk or 1024, lr=1e-4)
    if args.variant == "reference":
        optimizer = make_optimizer(Trainee(student, Objective(distill=True)), tc)
        student.train()

        def step(rows):
            optimizer.zero_grad(set_to_none=True)
            ids = rows.to(device)
            with torch.no_grad():
                t = teacher(input_ids=ids).logits  # (B, S, V)
            s = student(input_ids=ids).logits  # (B, S, V)
            v = s.shape[-1]
            log_q, log_p = F.log_softmax(s.float().view(-1, v), -1), F.log_softmax(t.float().view(-1, v), -1)
            loss = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)  # mean KL per token
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), tc.grad_clip)
            optimizer.step()
            return float(loss)
    else:
        trainee, teacher_mod = build(student, teacher, tc, d)
        optimizer = make_optimizer(trainee, tc)

        def step(rows):
            return train_step(trainee, teacher_mod, optimizer, rows, batch, tc, d)["loss"]

    _init_optimizer_state(optimizer)
    baseline = reset_peak(device)
    times, losses = [], []
    for i, rows in enumerate(batches):
        start = time.perf_counter()
        losses.append(step(rows))
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = batch * seq
    return {"case": args.case, "variant": args.variant, "chunk_tokens": chunk, "tokens": tokens,
            "vocab": student.config.vocab_size, "params_student": n_student, "params_teacher": n_teacher,
            "step_s": seconds, "tokens_per_s": tokens / seconds, "peak_mib": peak(device, baseline) / 2**20,
            "flops_per_step": (6 * n_student + 2 * n_teacher) * tokens, "first_loss": losses[0],
            "threads": torch.get_num_threads() if device == "cpu" else None}


def matmul_rate(device: str, n: int = 2048, repeats: int = 10) -> float:
    """float32 torch.mm rate of this machine (FLOP/s), best of `repeats`."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 2):
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------- parent: subprocesses, table, JSON

def _spawn(args: argparse.Namespace, extra: list[str]) -> dict:
    command = [sys.executable, __file__, "--worker", "--device", args.device, *extra]
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker {' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict], mm: float) -> str:
    """The side-by-side table, plus per-case speed and memory ratios."""
    head = (f"{'case':8} {'variant':10} {'chunk':>5} {'tok/step':>8} {'s/step':>7} {'tok/s':>8} "
            f"{'peak MiB':>9} {'GFLOP/s':>8} {'% mm':>5}")
    lines = [head, "-" * len(head)]
    for r in results:
        rate = r["flops_per_step"] / r["step_s"]
        lines.append(f"{r['case']:8} {r['variant']:10} {r['chunk_tokens'] or '-':>5} {r['tokens']:>8} "
                     f"{r['step_s']:>7.3f} {r['tokens_per_s']:>8.0f} {r['peak_mib']:>9.0f} "
                     f"{rate / 1e9:>8.1f} {100 * rate / mm:>5.1f}")
    lines.append(f"float32 torch.mm rate: {mm / 1e9:.1f} GFLOP/s")
    for case in dict.fromkeys(r["case"] for r in results):
        ref = next(r for r in results if r["case"] == case and r["variant"] == "reference")
        for r in (r for r in results if r["case"] == case and r["variant"] != "reference"):
            speed = r["tokens_per_s"] / ref["tokens_per_s"]
            memory = r["peak_mib"] / max(ref["peak_mib"], 1e-9)
            lines.append(f"{case} chunk {r['chunk_tokens']}: {speed:.2f}x the reference's tokens/s, "
                         f"{memory:.2f}x its peak memory")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--chunk-tokens", nargs="+", type=int, default=[256])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per worker (0: torch's default); on a shared machine more threads "
                             "than idle cores make every small op wait (OpenMP spinning)")
    parser.add_argument("--work-dir", help="where the benchmark models are saved (default: a temp dir)")
    parser.add_argument("--out", help="write the results here instead of benchmarks/results/kd_step.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--case", "--variant", "--teacher", "--student"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"flops": matmul_rate(args.device)} if args.matmul else worker(args)))
        return
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_kd_step."))
    mm = _spawn(args, ["--matmul"])["flops"]
    results = []
    for case in args.cases:
        specs = prepare(case, work)
        common = ["--case", case, "--teacher", specs["teacher"], "--student", specs["student"],
                  "--steps", str(args.steps), "--warmup", str(args.warmup)]
        results.append(_spawn(args, [*common, "--variant", "reference"]))
        for chunk in args.chunk_tokens:
            results.append(_spawn(args, [*common, "--variant", "compactlm", "--chunk-tokens", str(chunk)]))
        print(table([r for r in results if r["case"] == case], mm), flush=True)
    print("\n" + table(results, mm))
    ratios = Table(["benchmark", "compactlm", "plain reference", "ratio"])
    for r in results:
        if r["variant"] == "reference":
            ref = r
            continue
        ratios.add(f"KD training step, {r['case']} ({args.threads} thread(s))", f"our step, {r['chunk_tokens']} tokens per chunk",
                  "both models' full logits + `F.kl_div`", f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x faster, "
                  f"{r['peak_mib'] / max(ref['peak_mib'], 1e-9):.2f}x peak memory")
        rate = r["flops_per_step"] / r["step_s"]
        ratios.add(f"KD step's achieved FLOP rate, {r['case']}", f"{rate / 1e9:.1f} GFLOP/s",
                  f"{mm / 1e9:.0f} GFLOP/s measured `torch.mm`", f"{rate / mm:.0%} of matmul peak")
    write_result("kd_step", figures={"matmul_flops": mm, "device": args.device, "results": results,
                                      "cases": {c: CASES[c] for c in args.cases}}, tables={"ratios": ratios}, out=args.out)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
