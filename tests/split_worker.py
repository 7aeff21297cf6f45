"""Every distillation objective for a few steps on fixed tiny models and rows, with the global batch split as asked:
run by tests/test_split.py in its own process (whole batch, micro-batches) and under torchrun (2 processes, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/split_worker.py OUT_DIR

writes OUT_DIR/runs.pt (rank 0): {"states": {objective: the student's final full state dict}, "results": [per rank:
{objective: fit's result}]}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import VOCAB, tiny_model  # noqa: E402

from compactlm.config import load_config  # noqa: E402
from compactlm.distill.distributed import Dist, full_state, gather_objects, setup, teardown  # noqa: E402
from compactlm.distill.losses import teacher_topk  # noqa: E402
from compactlm.distill.loop import Session, batch_rows, fit  # noqa: E402

STEPS, BATCH, SEQ, TOP_K = 4, 4, 16, 8
# objective: (config keys, the student's family). Under torchrun the teacher is sharded (and offloaded for some):
# its loss terms must not change, and between steps each rank must hold only its shards of it.
OBJECTIVES = {
    "plain": (["distill.teacher_sharded=true"], "llama"),
    "cross-entropy": (["distill.ce_weight=0.3"], "llama"),
    "intermediate": (["distill.intermediate=true", "distill.teacher_sharded=true", "distill.teacher_offload=true"],
                     "llama"),
    "embedding": (["distill.embedding_loss=true", "distill.teacher_sharded=true"], "llama"),
    "router": (["distill.teacher_sharded=true", "distill.teacher_offload=true"], "qwen3_moe"),
    "cached top-K": ([f"distill.teacher_top_k={TOP_K}"], "llama"),
}


class _Targets:
    """The teacher's top-K targets of the rows in their order of use: a `TeacherCache` in memory."""

    def __init__(self, teacher, rows: torch.Tensor, seed: int):
        order = batch_rows(len(rows), 0, STEPS * BATCH, seed)  # (STEPS * BATCH,) the stream's rows
        with torch.no_grad():
            self.logp, self.ids = teacher_topk(teacher(input_ids=rows[order]).logits, TOP_K)  # (N, S, K) each

    def get(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logp[positions], self.ids[positions]


def run(objective: str, micro: int, d: Dist, out: Path) -> dict:
    """`fit` for STEPS steps of `objective` with global batches of BATCH rows in micro-batches of `micro`:
    {"state": the student's full state dict (rank 0), "result": fit's result on this rank}."""
    keys, family = OBJECTIVES[objective]
    teacher, student = tiny_model("llama", layers=4, seed=1), tiny_model(family, layers=2, seed=2)
    if family == "qwen3_moe":
        student.config.output_router_logits, student.config.router_aux_loss_coef = True, 0.5
    tc = load_config(None, [*keys, f"distill.steps={STEPS}", f"distill.batch_size={BATCH}", f"distill.seq_len={SEQ}",
                            f"distill.micro_batch_size={micro}", "distill.lr=0.001", "distill.warmup_steps=1",
                            "distill.eval_every=0"]).distill
    rows = torch.randint(2, VOCAB, (3 * BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    train, val = rows[:2 * BATCH], rows[2 * BATCH:]  # an epoch of 2 steps: the run sees 2 shuffles
    cache = _Targets(teacher, train, seed=0) if tc.teacher_top_k else None
    session = Session(out / objective.replace(" ", "-"), d, save=False)
    session.out_dir.mkdir(parents=True, exist_ok=True)
    result = fit(student, train, val, tc, session, teacher, teacher_cache=cache)
    return {"state": full_state(student)[0], "result": result}


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    d = setup("cpu")
    try:
        runs = {objective: run(objective, BATCH // d.world, d, out) for objective in OBJECTIVES}
        results = gather_objects({objective: r["result"] for objective, r in runs.items()}, d)
        if d.is_main:
            torch.save({"states": {objective: r["state"] for objective, r in runs.items()}, "results": results},
                       out / "runs.pt")
    finally:
        teardown(d)


if __name__ == "__main__":
    main()
