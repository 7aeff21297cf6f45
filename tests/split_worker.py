"""Every distillation objective for a few steps on fixed tiny models and rows, with the global batch split as asked:
run by tests/test_split.py in its own process (whole batch, micro-batches) and under torchrun (2 processes, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/split_worker.py OUT.pt [MICRO]

writes {objective: the trainee's final full state dict} (rank 0) to OUT.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import VOCAB, tiny_model  # noqa: E402

from compactlm.config import load_config  # noqa: E402
from compactlm.distill.distributed import Dist, full_state, setup, teardown  # noqa: E402
from compactlm.distill.losses import teacher_topk  # noqa: E402
from compactlm.distill.loop import build, make_optimizer, train_step  # noqa: E402
from compactlm.distill.trainee import CachedTeacher  # noqa: E402

STEPS, BATCH, SEQ, TOP_K = 4, 4, 16, 8
# objective: (config keys, the student's family)
OBJECTIVES = {
    "plain": ([], "llama"),
    "cross-entropy": (["distill.ce_weight=0.3"], "llama"),
    "intermediate": (["distill.intermediate=true"], "llama"),
    "embedding": (["distill.embedding_loss=true"], "llama"),
    "router": ([], "qwen3_moe"),
    "cached top-K": ([f"distill.teacher_top_k={TOP_K}"], "llama"),
}


class _Targets:
    """The teacher's top-K targets of every row of the run, by stream position: a `TeacherCache` in memory."""

    def __init__(self, teacher, rows: torch.Tensor):
        with torch.no_grad():
            self.logp, self.ids = teacher_topk(teacher(input_ids=rows).logits, TOP_K)  # (N, S, K) each

    def get(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logp[positions], self.ids[positions]


def run(objective: str, micro: int, d: Dist) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps of `objective` on this rank's share of each global batch of BATCH rows, in
    micro-batches of `micro`; the trainee's full state dict (on rank 0)."""
    keys, family = OBJECTIVES[objective]
    teacher, student = tiny_model("llama", layers=4, seed=1), tiny_model(family, layers=2, seed=2)
    if family == "qwen3_moe":
        student.config.output_router_logits, student.config.router_aux_loss_coef = True, 0.5
    tc = load_config(None, [*keys, f"distill.steps={STEPS}", f"distill.batch_size={BATCH}", f"distill.seq_len={SEQ}",
                            f"distill.micro_batch_size={micro}", "distill.lr=0.003", "distill.warmup_steps=1"]).distill
    rows = torch.randint(2, VOCAB, (STEPS * BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    targets = CachedTeacher(_Targets(teacher, rows)) if tc.teacher_top_k else None
    trainee, teacher_mod = build(student, teacher, tc, d)
    optimizer = make_optimizer(trainee, tc)
    per_rank = BATCH // d.world
    for step in range(STEPS):
        mine = torch.arange(step * BATCH + d.rank * per_rank, step * BATCH + (d.rank + 1) * per_rank)  # (B / world,)
        train_step(trainee, targets or teacher_mod, optimizer, rows[mine], micro, tc, d, mine)
    return full_state(trainee)[0]


def main() -> None:
    out, micro = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else BATCH // 2
    torch.set_num_threads(1)
    d = setup("cpu")
    try:
        states = {objective: run(objective, micro, d) for objective in OBJECTIVES}
        if d.is_main:
            torch.save(states, out)
    finally:
        teardown(d)


if __name__ == "__main__":
    main()
