"""GPU check: bf16 autocast, NCCL, FSDP2 (teacher sharded and CPU-offloaded), KD tokens/s and peak memory.

Builds a random ~0.5B-parameter Llama teacher (hidden 1536, 16 layers, ffn 6144, vocabulary 49152, SmolLM2's
tokenizer) and a student pruned from it by `compactlm prune`
(hidden 1024, ffn 3072), then runs a short `compactlm distill` per setting: one GPU; all GPUs with torchrun
(NCCL, FSDP2 student, replicated teacher); all GPUs with the teacher sharded; all GPUs with the teacher
sharded and offloaded to CPU. Prints one row per setting: tokens/s (median step) and peak GPU memory.

    bash scripts/gpu_check.sh [--steps 12] [--seq-len 1024] [--batch 16]
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

import torch

ROOT = Path(__file__).resolve().parents[1]


def check_bf16() -> str:
    """bf16 autocast matmul on the GPU against float32: the relative error a bf16 path should show."""
    a, b = torch.randn(1024, 1024, device="cuda"), torch.randn(1024, 1024, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        c = a @ b
    err = ((c.float() - a @ b).norm() / (a @ b).norm()).item()
    assert c.dtype == torch.bfloat16 and err < 1e-2, (c.dtype, err)
    return f"bf16 autocast ok (dtype {c.dtype}, relative error {err:.1e} vs float32)"


def make_teacher(path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compactlm.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    config = LlamaConfig(hidden_size=1536, intermediate_size=6144, num_attention_heads=12, num_key_value_heads=4,
                         head_dim=128, num_hidden_layers=16, vocab_size=len(tok), max_position_embeddings=4096,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)


def distill(label: str, procs: int, args: list[str], work: Path) -> dict:
    out = work / label.replace(" ", "_")
    cmd = [sys.executable, "-m", "compactlm", "distill", *args, f"out_dir={out}"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *cmd[1:]]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT / "src")})
    if proc.returncode:
        return {"setting": label, "error": proc.stderr.strip().splitlines()[-1][-200:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rate = statistics.median(r["tokens_per_s"] for r in rows[2:] or rows)  # after the warm-up steps
    return {"setting": label, "gpus": procs, "tokens_per_s": round(rate), "peak_gpu_gb": round(result.get("peak_gpu_gb", 0), 2),
            "wall_s": round(time.time() - start)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    gpus = torch.cuda.device_count()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} x {torch.cuda.get_device_name(0)}", flush=True)
    print(check_bf16(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="compactlm-gpu-check-"))
    teacher, student = work / "teacher", work / "student"
    make_teacher(teacher)
    subprocess.run([sys.executable, "-m", "compactlm", "prune", f"model={teacher}", f"out_dir={student}",
                    "data=python-docs", "target.hidden_size=1024", "target.intermediate_size=3072", "dtype=bfloat16",
                    "calib.sequences=32"], check=True, env=os.environ | {"PYTHONPATH": str(ROOT / "src")},
                   stdout=subprocess.DEVNULL)
    common = [f"teacher={teacher}", f"student={student}", "data=python-docs", "dtype=bfloat16",
              f"distill.steps={args.steps}", f"distill.batch_size={args.batch}", f"distill.seq_len={args.seq_len}",
              "distill.micro_batch_size=2", "distill.eval_every=0", "distill.save_every=0", "distill.eval_sequences=4"]
    settings = [("1 GPU", 1, [])]
    if gpus > 1:
        settings += [("FSDP2, teacher replicated", gpus, []),
                     ("FSDP2, teacher sharded", gpus, ["distill.teacher_sharded=true"]),
                     ("FSDP2, teacher sharded + CPU offload", gpus,
                      ["distill.teacher_sharded=true", "distill.teacher_offload=true"])]
    else:
        print("one GPU: NCCL and FSDP2 need 2+ GPUs; only the single-GPU row runs")
    print(f"\n{'setting':<38} {'GPUs':>4} {'tokens/s':>9} {'peak GB':>8} {'wall s':>7}")
    for label, procs, extra in settings:
        r = distill(label, procs, common + extra, work)
        if "error" in r:
            print(f"{label:<38} error: {r['error']}", flush=True)
        else:
            print(f"{label:<38} {procs:>4} {r['tokens_per_s']:>9} {r['peak_gpu_gb']:>8} {r['wall_s']:>7}", flush=True)


if __name__ == "__main__":
    main()
