"""bf16 on the CPU, measured: a KD training step of the main command's shapes in float32 against bf16 autocast,
side by side in one run, and the matrix-product rate of each dtype on this CPU.

    python benchmarks/bench_cpu_bf16.py [--steps 3] [--batch 4] [--result-name cpu_bf16]

The teacher is SmolLM2-135M's shape (30 layers, hidden 576, 9 heads in 3 KV groups, ffn 1536, vocab 49,152) and
the student the README's cut (hidden 384, 6 heads, ffn 1024), both with random weights: speed does not depend on
the values. One step: the teacher's forward without gradients, the student's forward and backward, compactlm's
chunked KD loss (its head products in float32, or in bf16 as compactlm's `autocast` runs them), AdamW. bf16
pays where the CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere torch
converts, and it can be slower than float32. Writes benchmarks/results/cpu_bf16.json (or NAME.json: the README
keeps a CPU without native bf16 as cpu_bf16_avx2.json beside one with it).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from common import README_SHAPE, Table, write_result
from transformers import LlamaConfig, LlamaForCausalLM

from compactlm.distill.losses import kd_loss

SHAPES = {"teacher": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9),
          "student": README_SHAPE}


def model(name: str) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=49152, num_hidden_layers=30, num_key_value_heads=3, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=2048, **SHAPES[name])
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def matmul_rate(dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def steps(teacher, student, ids, n: int, bf16: bool, bf16_head: bool = False) -> tuple[list[float], float]:
    """Seconds of each of `n` steps after one warm-up, and the last step's loss. `bf16_head`: the chunked loss's
    head products in bf16 too (hidden states and head weights cast, the softmax in float32), as on CUDA."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    seconds, loss = [], torch.zeros(())
    for i in range(n + 1):
        start = time.perf_counter()
        with cast:  # the models' forwards, as compactlm's trainee autocasts them; the chunked loss outside
            with torch.no_grad():
                t_hidden = teacher.model(input_ids=ids).last_hidden_state
            s_hidden = student.model(input_ids=ids).last_hidden_state
        dt = torch.bfloat16 if bf16_head else torch.float32
        loss = kd_loss(s_hidden[:, :-1].to(dt), student.lm_head.weight.to(dt), t_hidden[:, :-1].to(dt),
                       teacher.lm_head.weight.to(dt), torch.ones(ids.shape[0], ids.shape[1] - 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            seconds.append(time.perf_counter() - start)
    return seconds, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--result-name", default="cpu_bf16", help="benchmarks/results/NAME.json")
    args = parser.parse_args()
    rates = {str(d).removeprefix("torch."): matmul_rate(d) for d in (torch.float32, torch.bfloat16)}
    teacher, ids = model("teacher").eval(), torch.randint(0, 49152, (args.batch, args.seq_len))
    rows = {}
    variants = (("float32", False, False), ("bf16 autocast", True, False), ("bf16 autocast + bf16 loss head", True, True))
    for variant, bf16, bf16_head in variants:
        student = model("student").train()
        seconds, loss = steps(teacher, student, ids, args.steps, bf16, bf16_head)
        rows[variant] = {"step_s": statistics.median(seconds), "seconds": seconds, "loss": loss}
        print(variant, rows[variant], flush=True)
    table = Table(["variant", "median seconds per step", "tokens/s", "vs float32", "KD loss after the steps"])
    base = rows["float32"]["step_s"]
    for variant, r in rows.items():
        table.add(variant, f"{r['step_s']:.2f}", f"{args.batch * args.seq_len / r['step_s']:.0f}",
                  f"{base / r['step_s']:.2f}x", f"{r['loss']:.4f}")
    mm = Table(["dtype", "1024 x 1024 matmul GFLOP/s"])
    for dtype, rate in rates.items():
        mm.add(dtype, f"{rate / 1e9:.1f}")
    flags = open("/proc/cpuinfo").read()
    write_result(args.result_name, figures={"rows": rows, "matmul_flops": rates, "batch": args.batch, "seq_len": args.seq_len,
                                      "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags},
                 tables={"kd_step": table, "matmul": mm},
                 values={"native_bf16": "yes" if "avx512_bf16" in flags or "amx_bf16" in flags else "no"})


if __name__ == "__main__":
    main()
