"""NVIDIA Model Optimizer's distillation (`modelopt.torch.distill`) of a student from a teacher on given token
batches: a plain PyTorch loop around `mtd.convert(student, [("kd_loss", ...)])` and `compute_kd_loss()`.
Run by benchmarks/bench_modelopt_kd.py in the Model Optimizer venv (scripts/setup_modelopt.sh):

    .venv-modelopt/bin/python benchmarks/modelopt_kd_worker.py --teacher DIR --student DIR --rows rows.pt \
        --out OUT_DIR --lr 1e-3 --min-lr 1e-4 --warmup-steps 5 --reduction token

Loss: `mtd.LogitsDistillationLoss` (KL(teacher || student) x T^2) on the two lm_head outputs (B, S, V).
--reduction token: per-token KL (reduction="none", summed over the vocabulary by modelopt) averaged over the
B x S tokens, what compactlm and modelopt's own HF KDTrainer optimise; --reduction mean: modelopt's default,
F.kl_div(reduction="mean"), which averages over B x S x V elements, i.e. the same loss divided by V.
AdamW, warm-up + cosine and decay groups are compactlm's own (`make_optimizer`, `make_schedule`), so only the
distillation machinery differs. Writes OUT_DIR/final (the exported student), OUT_DIR/metrics.jsonl and
OUT_DIR/result.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import modelopt.torch.distill as mtd
import torch
from transformers import AutoModelForCausalLM

from compactlm.config import TrainConfig
from compactlm.distill.loop import make_optimizer, make_schedule


def distillation_model(student: torch.nn.Module, teacher: torch.nn.Module, temperature: float, reduction: str):
    """The student converted to modelopt's DistillationModel, KD loss between the two lm_head outputs."""
    loss = mtd.LogitsDistillationLoss(temperature=temperature, reduction="none" if reduction == "token" else "mean")
    config = mtd.KDLossConfig(teacher_model=teacher, criterion={("lm_head", "lm_head"): loss})
    return mtd.convert(student, mode=[("kd_loss", config)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="HF checkpoint folder")
    parser.add_argument("--student", required=True, help="HF checkpoint folder")
    parser.add_argument("--rows", required=True, help=".pt file with 'train': (steps, B, S) token ids")
    parser.add_argument("--out", required=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reduction", choices=("token", "mean"), default="token")
    args = parser.parse_args()

    batches = torch.load(args.rows)["train"]  # (steps, B, S) int32, in compactlm's order
    steps, batch, seq = batches.shape
    tc = TrainConfig(steps=steps, batch_size=batch, seq_len=seq, lr=args.lr, min_lr=args.min_lr,
                     warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32).train()
    model = distillation_model(student, teacher, args.temperature, args.reduction)
    optimizer = make_optimizer(model, tc)  # the teacher is frozen: only the student's parameters
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = make_schedule(optimizer, steps, tc)
    per_token = (lambda kl: kl.mean()) if args.reduction == "token" else None  # kl: (B, S) per-token KL

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for step in range(steps):
        tick, lr = time.perf_counter(), scheduler.get_last_lr()[0]
        ids = batches[step].long()  # (B, S)
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)  # teacher, then student
        loss = model.compute_kd_loss(loss_reduction_fn=per_token)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
        optimizer.step()
        scheduler.step()
        rows.append({"step": step + 1, "tokens": (step + 1) * batch * seq, "loss": loss.item(),
                     "grad_norm": float(norm), "lr": lr, "seconds": time.perf_counter() - tick})
        print(json.dumps(rows[-1]), flush=True)
    student = mtd.export(model)
    student.save_pretrained(out / "final")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "result.json").write_text(json.dumps({"reduction": args.reduction, "steps": steps, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
