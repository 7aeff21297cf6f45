"""The prepared GPU check: the whole CUDA path as a user runs it, in one table; `--cpu` rehearses it at tiny size.

Stages, each a `compactlm` command in its own process:
1. bf16 autocast on the GPU against float32 (CUDA only);
2. score and prune the built-in SmolLM2-135M (a Q4_1 GGUF, dequantized) in bfloat16 to the README's shape
   (--cpu: a tiny random Llama with SmolLM2's tokenizer, in float32);
3. distill it under torchrun on every visible GPU (--cpu: 2 processes, gloo) in bfloat16: the student sharded
   with FSDP2 (bf16 mixed precision), the teacher sharded and offloaded to the CPU; the teacher parameters each
   rank holds before the first step and after the last;
4. the same distillation killed (SIGKILL) after its first checkpoint, then resumed to the end;
5. export of the distilled student to GGUF (q8_0).
One summary row per stage: seconds, tokens/s (median step), peak GPU memory, losses. Exits non-zero when a
stage fails, after printing the table.

    bash scripts/gpu_check.sh [--steps 24]        # a GPU machine, after scripts/setup.sh
    python benchmarks/gpu_check.py --cpu          # anywhere: what CI runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import TARGET

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                    "TOKENIZERS_PARALLELISM": "false"}
TINY_SHAPE = ["target.hidden_size=32", "target.num_attention_heads=4", "target.intermediate_size=64"]


def check_bf16() -> str:
    """bf16 autocast matmul on the GPU against float32: the relative error a bf16 path should show."""
    a, b = torch.randn(1024, 1024, device="cuda"), torch.randn(1024, 1024, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        c = a @ b
    err = ((c.float() - a @ b).norm() / (a @ b).norm()).item()
    assert c.dtype == torch.bfloat16 and err < 1e-2, (c.dtype, err)
    return f"bf16 autocast ok (dtype {c.dtype}, relative error {err:.1e} vs float32)"


def make_tiny_teacher(path: Path) -> None:
    """A tiny random Llama (hidden 64, 4 layers, 8 heads in 4 KV groups) with SmolLM2's tokenizer (--cpu)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compactlm.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=8, num_hidden_layers=4, vocab_size=len(tok), max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


def command(verb: str, keys: list[str], procs: int) -> list[str]:
    """`compactlm VERB keys...`, under torchrun when procs > 1."""
    if procs > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                "-m", "compactlm", verb, *keys]
    return [sys.executable, "-m", "compactlm", verb, *keys]


def stage(name: str, verb: str, keys: list[str], procs: int = 1) -> dict:
    """Run one command; its row: the JSON it printed last, seconds, or its error (compactlm's one line, else the
    last line of the log; the whole log is printed below the table)."""
    start = time.time()
    proc = subprocess.run(command(verb, keys, procs), capture_output=True, text=True, env=ENV)
    row = {"stage": name, "procs": procs, "seconds": round(time.time() - start, 1)}
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        error = next((line for line in reversed(lines) if "error:" in line), lines[-1])
        return row | {"error": error[-300:], "log": proc.stderr[-4000:]}
    return row | {"result": json.loads(proc.stdout.strip().splitlines()[-1])}


def killed_and_resumed(keys: list[str], out: Path, procs: int) -> dict:
    """The distillation SIGKILLed (torchrun and its workers) once its first checkpoint exists, then resumed."""
    from compactlm.distill import checkpoint as ckpt

    start = time.time()
    first = subprocess.Popen(command("distill", [*keys, f"out_dir={out}"], procs), env=ENV, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while first.poll() is None and ckpt.latest(out) is None:
        time.sleep(0.2)
    if first.poll() is not None:
        return {"stage": "kill + resume", "procs": procs, "error": "the run ended before its first checkpoint"}
    _kill_tree(first.pid)  # torchrun's workers may sit in process groups of their own
    first.wait()
    at = ckpt.read_progress(ckpt.latest(out)).step
    row = stage("kill + resume", "distill", [*keys, f"out_dir={out}", "resume=true"], procs)
    return row | {"seconds": round(time.time() - start, 1), "resumed_at": at}


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it, as a power cut would, and wait until they are gone."""
    victims = [*_descendants(pid), pid]
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    while any(Path(f"/proc/{v}").exists() and "Z" not in _state(v) for v in victims if v != pid):
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def tokens_per_s(out: Path) -> float | None:
    """Median tokens/s of a run's steps after the first two (compilation, allocator warm-up)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return round(statistics.median(rates[2:] or rates)) if rates else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny models, 2 CPU processes with gloo (what CI runs)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default 24 on GPU, 6 on CPU)")
    p.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a new temporary one)")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("no CUDA device: run with --cpu for the tiny rehearsal", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="compactlm-gpu-check-"))
    procs = torch.cuda.device_count() if cuda else 2
    if cuda:
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {procs} x {torch.cuda.get_device_name(0)}")
        print(check_bf16())
        teacher, dtype, shape, steps, batch, seq = "smollm2-135m", "bfloat16", TARGET, args.steps or 24, 16, 1024
    else:
        teacher, dtype, shape, steps, batch, seq = str(work / "teacher"), "float32", TINY_SHAPE, args.steps or 6, 4, 64
        make_tiny_teacher(work / "teacher")
    print(f"work folder {work}", flush=True)
    common = ["data=python-docs", f"dtype={dtype}", "calib.sequences=32", f"calib.seq_len={256 if cuda else 64}"]
    rows = [stage("score", "score", [f"model={teacher}", f"out_dir={work / 'scores'}", *common])]
    rows.append(stage("prune (with the refit)", "prune", [f"model={teacher}", f"out_dir={work / 'student'}",
                                                           f"importance.scores={work / 'scores' / 'scores.safetensors'}", *shape, *common]))
    distill = [f"teacher={teacher}", f"student={work / 'student'}", "data=python-docs", f"dtype={dtype}",
               f"distill.steps={steps}", f"distill.batch_size={batch * procs}", f"distill.seq_len={seq}",
               f"distill.micro_batch_size={batch}", f"distill.save_every={steps // 3}", f"distill.eval_every={steps}",
               "distill.eval_sequences=8", "distill.teacher_sharded=true", "distill.teacher_offload=true"]
    rows.append(stage("distill (teacher sharded + offloaded)", "distill", [*distill, f"out_dir={work / 'distill'}"],
                      procs))
    rows.append(killed_and_resumed(distill, work / "resumed", procs))
    rows.append(stage("export q8_0", "export", [f"model={work / 'distill' / 'final'}", f"out={work / 'student.gguf'}",
                                                "export.type=q8_0"]))
    for row, out in zip(rows[2:4], (work / "distill", work / "resumed")):
        if "result" in row:
            row["tokens_per_s"] = tokens_per_s(out)
    print_table(rows)
    for row in rows:
        if "log" in row:
            print(f"\n--- {row['stage']}: the end of its log\n{row.pop('log')}", file=sys.stderr)
    (work / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return int(any("error" in row for row in rows))


def print_table(rows: list[dict]) -> None:
    """The summary: one line per stage."""
    print(f"\n{'stage':<40} {'procs':>5} {'s':>6} {'tok/s':>7} {'peak GB':>7} {'val loss':>8}  notes")
    for row in rows:
        r = row.get("result", {})
        notes = row.get("error", "")
        if "teacher_resident_params" in r:
            start, end = r["teacher_resident_params"]
            notes += f"teacher params on rank 0: {start:,} before, {end:,} after"
        if "resumed_at" in row:
            notes += f"; resumed at step {row['resumed_at']}, ended at {r.get('steps')}"
        peak = f"{r['peak_gpu_gb']:.2f}" if "peak_gpu_gb" in r else "-"
        loss = f"{r['val_loss']:.3f}" if "val_loss" in r else "-"
        print(f"{row['stage']:<40} {row['procs']:>5} {row.get('seconds', '-'):>6} {row.get('tokens_per_s') or '-':>7} "
              f"{peak:>7} {loss:>8}  {notes}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
