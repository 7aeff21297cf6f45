"""The training loop shared by `distill` and `train`: one readable `fit`, on one CPU or many GPUs.

Per optimizer step: the global batch (`batch_size` rows of the seeded per-epoch shuffle) is cut into one
slice per rank and micro-batches of `micro_batch_size`; each micro-batch's loss is weighted by its share of
the global batch's tokens, so gradients (and the logged loss) equal those of the whole batch in one
process. Then: clip the gradient norm, AdamW step, LR schedule step (linear warm-up, cosine to min_lr).

Objectives (`Trainee.forward`):
- train: next-token cross-entropy, computed in chunks of tokens (the logits of a chunk are recomputed in
  backward), so full-size float32 logits never exist.
- distill: the chunked forward KL(teacher || student) at `temperature` (+ `ce_weight` x CE) from the final
  hidden states and the two lm_head weights (`losses.kd_loss`); with `intermediate`/`layer_map`/
  `embedding_loss`: + alpha x sum of cosine losses between `hidden_map(student state)` and the teacher
  state for each (student, teacher) pair of indices into HF `hidden_states` (0 = embedding output), where
  alpha = L_logits / L_intermediate (detached), both over the global batch.
A mixture of experts whose config sets output_router_logits adds its load-balancing loss, its statistics over
the global batch too. Those two terms are not sums over tokens: when the global batch is split (micro-batches,
ranks), a forward without gradients over all of it fixes them first (`Trainee` with `sums=True`), and then every
objective is the same function of the global batch however it is divided; only the gradient's rounding differs.
The objectives themselves live in trainee.py. The forwards autocast to bf16 as the `autocast` key resolves
(`precision.py`: on CUDA, and on a CPU that multiplies bf16 natively); the chunked losses then get bf16
inputs explicitly (their softmax and sums stay float32).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from compactlm.config import TrainConfig
from compactlm.distill import checkpoint as ckpt
from compactlm.distill import precision
from compactlm.distill.distributed import Dist, all_reduce_sum, resident_params, shard_
from compactlm.distill.trainee import CachedTeacher, Teacher, Trainee, batch_terms, hidden_map, make_objective
from compactlm.errors import CompactLMError
from compactlm.models.family import family_of, get_module

log = logging.getLogger(__name__)

BETAS = (0.9, 0.95)  # AdamW, as in the Minitron papers


# ---------------------------------------------------------------- schedule and data order

def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up to tc.lr, then cosine to tc.min_lr at total-1."""
    warm = min(tc.warmup_steps, total)
    if step < warm:
        return tc.lr * (step + 1) / warm
    progress = min((step - warm) / max(total - warm - 1, 1), 1.0)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1.0 + math.cos(math.pi * progress))


def micro_batch(tc: TrainConfig, d: Dist, section: str = "distill") -> int:
    """Rows per forward on each rank: tc.micro_batch_size, else the rank's whole share of the global batch; a
    one-line error naming `section`'s key when the global batch is not a whole number of micro-batches on every
    rank."""
    micro = tc.micro_batch_size or tc.batch_size // d.world
    if micro < 1 or tc.batch_size % (d.world * micro):
        raise CompactLMError(f"{section}.batch_size={tc.batch_size} must be a multiple of world size x "
                             f"micro_batch_size = {d.world} x {micro}")
    return micro


def total_steps(tc: TrainConfig) -> int:
    """Optimizer steps of a run: tc.steps, else the token budget // tokens per global batch."""
    return tc.steps if tc.steps is not None else tc.tokens // (tc.batch_size * tc.seq_len)


@functools.lru_cache(maxsize=4)
def epoch_order(n_rows: int, seed: int, epoch: int) -> Tensor:
    """(n_rows,) permutation of the train rows for one epoch, from a generator seeded by (seed, epoch)."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_rows(n_rows: int, start: int, count: int, seed: int) -> Tensor:
    """(count,) row indices at positions [start, start+count) of the endless stream of epoch shuffles."""
    parts, pos = [], start
    while pos < start + count:
        epoch, offset = divmod(pos, n_rows)
        take = min(start + count - pos, n_rows - offset)
        parts.append(epoch_order(n_rows, seed, epoch)[offset: offset + take])
        pos += take
    return torch.cat(parts)


# ---------------------------------------------------------------- one step, validation, saving

def train_step(trainee: Trainee, teacher: Teacher | CachedTeacher | None, optimizer: torch.optim.Optimizer,
               rows: Tensor, micro: int, tc: TrainConfig, d: Dist, row_ids: Tensor | None = None,
               step: int = 1) -> dict[str, float]:
    """Optimizer step number `step` on this rank's rows (b, S) (`row_ids` (b,): where a cached teacher finds their
    targets): accumulate micro-batch grads, clip, step; metrics. A loss or gradient norm that is not finite is a
    one-line error before the weights change."""
    optimizer.zero_grad(set_to_none=True)
    row_ids = row_ids if row_ids is not None else torch.full((len(rows),), -1)
    micros = [(r.to(d.device).long(), torch.ones_like(r, device=d.device, dtype=torch.long), i)
              for r, i in zip(rows.split(micro), row_ids.split(micro))]  # (m, S), (m, S), (m,) each
    counts = [trainee.count(ids, mask) for ids, mask, _ in micros]
    total = float(all_reduce_sum(torch.tensor(float(sum(counts)), dtype=torch.float64), d))
    targets = [None] * len(micros)  # the teacher's outputs, computed once
    batch = None
    if trainee.global_terms and (len(micros) > 1 or d.sharded):  # the batch is split: fix its terms first
        targets = [teacher(ids, mask, index) if teacher is not None else None for ids, mask, index in micros]
        batch = batch_terms(_sum_over_batch([trainee(ids, mask, t, sums=True) for (ids, mask, _), t
                                             in zip(micros, targets)], d))
    sums: dict[str, Tensor] = {}
    for (ids, mask, index), n, target in zip(micros, counts, targets):
        if target is None and teacher is not None:
            target = teacher(ids, mask, index)
        parts = trainee(ids, mask, target, batch=batch)
        weight = n / total  # the micro-batch's share of the global batch's tokens
        (parts["loss"] * (weight * d.world)).backward()  # FSDP averages gradients over ranks
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value.detach().double() * weight
    norm = torch.nn.utils.clip_grad_norm_(trainee.parameters(), tc.grad_clip or math.inf)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    keys = sorted(sums)
    row = dict(zip(keys, all_reduce_sum(torch.stack([sums[k] for k in keys]), d).tolist())) | {"grad_norm": norm}
    if not (math.isfinite(row["loss"]) and math.isfinite(norm)):
        raise CompactLMError(f"step {step}: the loss is {row['loss']:g} and the gradient norm {norm:g}; the weights "
                             "were not updated and nothing more is saved: try a lower lr")
    optimizer.step()
    return row


def _sum_over_batch(parts: list[dict[str, Tensor]], d: Dist) -> dict[str, Tensor]:
    """{key: sum over every micro-batch of every rank} of float64 tensors with the same keys and shapes."""
    keys = sorted(parts[0])
    flat = torch.cat([torch.stack([p[k].reshape(-1) for p in parts]).sum(0) for k in keys])
    flat, out, at = all_reduce_sum(flat, d), {}, 0
    for k in keys:
        size = parts[0][k].numel()
        out[k], at = flat[at: at + size].reshape(parts[0][k].shape), at + size
    return out


def validate(trainee: Trainee, teacher: Teacher | None, val_rows: Tensor, micro: int,
             d: Dist) -> dict[str, float]:
    """val_loss/val_ppl (+ val_kl/val_top1 with a teacher) on `val_rows`, shared out over ranks."""
    chunks = list(val_rows.split(micro))
    calls = math.ceil(len(chunks) / d.world)  # every rank runs the same number of forwards (FSDP collectives)
    sums = torch.zeros(5, dtype=torch.float64)
    trainee.eval()
    with torch.no_grad():
        for i in range(calls):
            index = i * d.world + d.rank
            ids = chunks[min(index, len(chunks) - 1)].to(d.device).long()  # a spare rank repeats a chunk, weight 0
            mask = torch.ones_like(ids)
            t_out = teacher(ids, mask) if teacher is not None else None
            part = trainee(ids, mask, t_out, evaluate=True)["sums"]
            sums += part.cpu() * (index < len(chunks))
    if teacher is not None:
        teacher.release()
    trainee.train()
    ce, targets, kl, top1, positions = all_reduce_sum(sums, d).tolist()
    loss = ce / max(targets, 1)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
    return out | ({"val_kl": kl / positions, "val_top1": top1 / positions} if teacher is not None else {})


# ---------------------------------------------------------------- the loop

@dataclass(frozen=True)
class Session:
    """Where and how a run executes (everything `fit` needs besides models, data and the train config)."""

    out_dir: Path
    dist: Dist
    tokenizer: Any = None  # saved beside the exported weights
    seed: int = 0  # data order (with the epoch)
    resume: bool = False  # continue from out_dir/checkpoint/ when there is one
    progress: bool = False  # tqdm bar (rank 0 only)
    save: bool = True  # write checkpoints, best/ and final/ (off for the search's brief trial runs)
    param_dtype: torch.dtype | None = None  # bfloat16: a sharded student gathers and computes in it (`shard_`)
    autocast: torch.dtype | None = None  # the models' forwards autocast to it (`precision.autocast_dtype`)


class MetricsLog:
    """out_dir/metrics.jsonl (+ TensorBoard when importable), rank 0 only; keeps rows up to `keep_until`."""

    def __init__(self, out_dir: Path, enabled: bool, keep_until: int):
        self.path, self.enabled, self.board = out_dir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        old = self.path.read_text().splitlines() if self.path.is_file() else []
        kept = [line for line in old if _step_of(line) <= keep_until]  # drop rows after the checkpoint
        self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            log.debug("tensorboard is not installed: metrics go to %s only", self.path)

    def write(self, row: dict) -> None:
        """Append one row ({"step": ..., ...}) to the log."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key, value in row.items():
                if key != "step":
                    self.board.add_scalar(key, value, row["step"])

    def close(self) -> None:  # noqa: D102
        if self.board is not None:
            self.board.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a torn or foreign line (so it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def make_optimizer(trainee: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW: weight decay on the student's matrices, none on norms, biases and the hidden-state map."""
    decay, no_decay = [], []
    for name, p in trainee.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.startswith("hidden_map.") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=BETAS)


def make_schedule(optimizer: torch.optim.Optimizer, total: int, tc: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine to min_lr over `total` steps (`lr_at`), as a scheduler stepped once per step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, tc) / tc.lr)


def build(student: nn.Module, teacher: nn.Module | None, tc: TrainConfig, d: Dist,
          hidden_keep: Tensor | None = None, param_dtype: torch.dtype | None = None,
          autocast: torch.dtype | None = None) -> tuple[Trainee, Teacher | None]:
    """The trainee (student + map) and the teacher, on the device, sharded with FSDP2 under torchrun.

    `hidden_keep` (H_s,): the teacher channel each student channel was pruned from (plan.json's "hidden").
    `param_dtype`: the sharded student's gathered parameters and compute in this dtype (`shard_`).
    `autocast`: both models' forwards autocast to this dtype (None: float32 compute).
    """
    s_family = family_of(student)
    s_dims = s_family.dims(student.config)
    t_dims = family_of(teacher).dims(teacher.config) if teacher is not None else None
    objective = make_objective(tc, s_dims.layers, t_dims.layers if t_dims else None)
    if hidden_keep is not None and t_dims is not None and (
            len(hidden_keep) != s_dims.hidden or int(hidden_keep.max()) >= t_dims.hidden):
        raise CompactLMError(f"the student's pruning plan keeps {len(hidden_keep)} hidden channels of up to "
                             f"{int(hidden_keep.max()) + 1}; student hidden {s_dims.hidden}, teacher {t_dims.hidden}")
    mapping = hidden_map(s_dims.hidden, t_dims.hidden, hidden_keep) if objective.layer_map else None
    if tc.activation_checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
        enable = getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
    trainee = shard_(Trainee(student, objective, mapping, autocast).to(d.device).train(),
                     get_module(student, s_family.layers_path), d, param_dtype=param_dtype)
    if teacher is None:
        return trainee, None
    wrapped = Teacher(teacher, tuple(t for _, t in objective.layer_map), autocast)
    if tc.teacher_sharded and d.sharded:  # loaded on the CPU: each rank moves only its shards (or none: offload)
        t_family = family_of(teacher)
        embed, head = get_module(teacher, t_family.embed_path), get_module(teacher, t_family.lm_head_path)
        units = () if embed.weight is head.weight else (embed,)  # tied: the root holds the one matrix
        shard_(wrapped, get_module(teacher, t_family.layers_path), d, offload=tc.teacher_offload, units=units)
    else:
        wrapped.to(d.device)
    return trainee, wrapped


@dataclass
class _Run:
    """One student's training state inside `fit`."""

    trainee: Trainee
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR


def fit(students: nn.Module | list[nn.Module], train_rows: Tensor, val_rows: Tensor, tc: TrainConfig,
        session: Session, teacher: nn.Module | None = None, hidden_keep: Tensor | None = None,
        teacher_cache=None) -> dict[str, Any] | list[dict[str, Any]]:
    """Train a student on (N, S) train rows (KD from `teacher` when given, from its top-K targets in
    `teacher_cache`, a built `TeacherCache` of these rows in their order of use, when given too: the teacher
    then only validates); checkpoints, best/ and final/ as `session` says. Returns its result.

    `students` a list of k models (the search's brief trials): they step on the same batches, one teacher
    forward per micro-batch serving them all, and each ends with the weights it reaches alone; nothing is saved,
    resumed or validated before the end. Returns one result per student."""
    several = isinstance(students, (list, tuple))
    models = list(students) if several else [students]
    if several and (session.save or session.resume or teacher_cache is not None or hidden_keep is not None):
        raise ValueError("students trained together are trials: no saving, resuming, teacher cache or hidden map")
    d, out = session.dist, session.out_dir
    micro, total = micro_batch(tc, d), total_steps(tc)
    runs = []
    for model in models:
        trainee, teacher_mod = build(model, teacher, tc, d, hidden_keep, session.param_dtype, session.autocast)
        optimizer = make_optimizer(trainee, tc)
        runs.append(_Run(trainee, optimizer, make_schedule(optimizer, total, tc)))
    resident = resident_params(teacher_mod) if teacher_mod is not None else 0  # this rank's, before any forward
    step_teacher = CachedTeacher(teacher_cache) if teacher_cache is not None else teacher_mod
    shared = _SharedTeacher(step_teacher) if several and step_teacher is not None else None
    found = ckpt.latest(out) if session.resume else None
    progress = ckpt.Progress(total_steps=total)
    if found:
        progress = ckpt.resume_(found, runs[0].trainee, runs[0].optimizer, runs[0].scheduler, d)
    log.info("%s at step %d of %d", f"resuming from {found}" if found else "starting", progress.step, total)
    evaluate = functools.partial(_evaluate_, runs[0].trainee, teacher_mod, val_rows, micro, progress, session)
    metrics = MetricsLog(out, d.is_main and not several, keep_until=progress.step)
    desc = ("distill" if teacher is not None else "train") + (f" {len(runs)} together" if several else "")
    bar = tqdm(total=total, initial=progress.step, unit="step", desc=desc,
               disable=not (session.progress and d.is_main), dynamic_ncols=True)
    start, val = time.perf_counter(), {}
    try:
        while progress.step < total:
            tick, lr = time.perf_counter(), runs[0].scheduler.get_last_lr()[0]
            index = _rank_rows(len(train_rows), progress.rows_seen, tc.batch_size, session.seed, d)  # (B/world,)
            per_rank = len(index)  # a cache holds rows in order of use: look them up by stream position
            where = progress.rows_seen + d.rank * per_rank + torch.arange(per_rank) if teacher_cache is not None else index
            if shared is not None:
                shared.next_batch()
            for run in runs:
                if shared is not None:
                    shared.rewind()
                row = train_step(run.trainee, shared or step_teacher, run.optimizer, train_rows[index], micro, tc, d,
                                 where, progress.step + 1)
                run.scheduler.step()
            if teacher_mod is not None:
                teacher_mod.release()  # every student has used the step's teacher outputs
            progress.step, progress.rows_seen = progress.step + 1, progress.rows_seen + tc.batch_size
            progress.tokens += tc.batch_size * tc.seq_len
            row = {"step": progress.step, "tokens": progress.tokens, **row, "lr": lr,
                   "tokens_per_s": tc.batch_size * tc.seq_len / (time.perf_counter() - tick)}
            last = progress.step == total
            val = evaluate() if not several and (_every(progress.step, tc.eval_every) or last) else {}
            if _every(progress.step, tc.log_every) or val or last:
                metrics.write(row | val)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            if session.save and (_every(progress.step, tc.save_every) or last):
                ckpt.save_state(out, runs[0].trainee, runs[0].optimizer, runs[0].scheduler, progress, d)
        if several:
            wall = time.perf_counter() - start
            return [{"steps": progress.step, "tokens": progress.tokens, "wall_s": wall,
                     **validate(run.trainee, None, val_rows, micro, d)} for run in runs]
        val = val or evaluate()  # a resumed finished run: evaluate the weights it ends with
        if session.save:
            ckpt.export_(out / "final", runs[0].trainee, session.tokenizer, d)
    finally:
        bar.close()
        metrics.close()
    best = None if math.isinf(progress.best_val_loss) else progress.best_val_loss
    out = {"steps": progress.step, "tokens": progress.tokens, **val, "best_val_loss": best,
           "wall_s": time.perf_counter() - start, "compute": precision.describe(session.autocast)}
    if teacher_mod is not None:  # the teacher's parameters this rank holds before the first step and after the last
        out["teacher_resident_params"] = [resident, resident_params(teacher_mod)]
    if d.device.type == "cuda":  # this rank's peak, for the GPU check and the README's sizes
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
    return out


class _SharedTeacher:
    """The teacher's outputs for one batch, computed for the first student's step and replayed to the others."""

    def __init__(self, teacher: Teacher | CachedTeacher):
        self.teacher, self.outs, self.calls = teacher, [], 0

    def next_batch(self) -> None:
        self.outs, self.calls = [], 0

    def rewind(self) -> None:
        self.calls = 0

    def __call__(self, ids: Tensor, mask: Tensor, rows: Tensor | None = None):
        if self.calls == len(self.outs):
            self.outs.append(self.teacher(ids, mask, rows))
        self.calls += 1
        return self.outs[self.calls - 1]


def _rank_rows(n_rows: int, rows_seen: int, batch_size: int, seed: int, d: Dist) -> Tensor:
    """This rank's contiguous slice (B / world,) of the next global batch of the shuffled stream: row indices."""
    order = batch_rows(n_rows, rows_seen, batch_size, seed)  # (B,)
    per_rank = batch_size // d.world
    return order[d.rank * per_rank: (d.rank + 1) * per_rank]


def _evaluate_(trainee: Trainee, teacher: Teacher | None, val_rows: Tensor, micro: int,
               progress: ckpt.Progress, session: Session) -> dict[str, float]:
    """Validate; when the loss beats progress.best_val_loss, record it and export the student to best/."""
    result = validate(trainee, teacher, val_rows, micro, session.dist)
    if result["val_loss"] < progress.best_val_loss:
        progress.best_val_loss = result["val_loss"]
        if session.save:
            ckpt.export_(session.out_dir / "best", trainee, session.tokenizer, session.dist)
    return result


def _every(step: int, period: int | None) -> bool:
    return bool(period) and step % period == 0
