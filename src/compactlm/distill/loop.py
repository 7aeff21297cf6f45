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
  alpha = L_logits / L_intermediate (detached), computed per micro-batch.
The student and its `hidden_map` live in one module (`Trainee`), the FSDP root, so that every use of the
root's parameters (embeddings, lm_head, map) happens inside its forward. bf16 autocast on CUDA, float32
on CPU; the chunked losses get bf16 inputs explicitly on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute
from tqdm.auto import tqdm

from compactlm.config import DistillConfig, TrainConfig
from compactlm.distill import checkpoint as ckpt
from compactlm.distill.distributed import Dist, all_reduce_sum, shard_
from compactlm.distill.losses import IGNORE_INDEX, cosine_loss, default_layer_map, dynamic_alpha, kd_loss
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


# ---------------------------------------------------------------- objectives

@dataclass(frozen=True)
class Objective:
    """What a micro-batch's loss is: CE (no teacher) or KD (+CE, + cosine on `layer_map` hidden states)."""

    distill: bool = False
    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 1024
    layer_map: tuple[tuple[int, int], ...] = ()  # (student, teacher) indices into HF hidden_states


def make_objective(tc: TrainConfig, student_layers: int, teacher_layers: int | None) -> Objective:
    """The objective a config asks for; the layer map validated against both models' depths."""
    if teacher_layers is None or not isinstance(tc, DistillConfig):
        return Objective(chunk_tokens=tc.chunk_tokens)
    pairs: list[tuple[int, int]] = []
    if tc.intermediate or tc.layer_map is not None:
        pairs = default_layer_map(student_layers, teacher_layers, tc.layer_map)
    if tc.embedding_loss and (0, 0) not in pairs:
        pairs.insert(0, (0, 0))
    return Objective(True, tc.temperature, tc.ce_weight, tc.chunk_tokens, tuple(pairs))


def hidden_map(student_hidden: int, teacher_hidden: int) -> nn.Linear:
    """The learned student -> teacher width map: identity on the first min(widths) channels, no bias."""
    linear = nn.Linear(student_hidden, teacher_hidden, bias=False)
    with torch.no_grad():
        nn.init.eye_(linear.weight)  # (H_t, H_s)
    return linear


def next_token_labels(ids: Tensor, mask: Tensor) -> Tensor:
    """(B, S) labels: ids[:, 1:] where both positions are unmasked, else IGNORE_INDEX (last column too)."""
    keep = mask[:, :-1].bool() & mask[:, 1:].bool()  # (B, S-1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(keep, ids[:, 1:], IGNORE_INDEX)
    return labels


def _ce_sum(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="sum")  # (c, V) logits


def chunked_ce(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int) -> Tensor:
    """Mean CE over labels != IGNORE_INDEX: hidden (N, H), head (V, H), labels (N,); (chunk, V) at a time."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
    h, y = hidden.index_select(0, rows), labels.index_select(0, rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.numel(), chunk):
        total = total + recompute(_ce_sum, h[start: start + chunk], weight, bias, y[start: start + chunk],
                                  use_reentrant=False)
    return total / max(rows.numel(), 1)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class TeacherOut(NamedTuple):
    """What the student's loss needs from the teacher for one micro-batch."""

    hidden: Tensor  # (B, S, H_t) final hidden states (after the final norm)
    states: tuple[Tensor, ...]  # (B, S, H_t) hidden states at the layer map's teacher indices
    head: Tensor  # (V, H_t) lm_head weight
    bias: Tensor | None  # (V,) or None


class Teacher(nn.Module):
    """A frozen teacher in eval mode: forward(ids, mask) -> TeacherOut, without gradients."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...] = ()):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.layers = layers
        self.family = family_of(model)

    @torch.no_grad()
    def forward(self, ids: Tensor, mask: Tensor) -> TeacherOut:  # noqa: D102
        with _autocast(ids.device):
            out = get_module(self.model, self.family.base_path)(
                input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=bool(self.layers))
        head = get_module(self.model, self.family.lm_head_path)
        states = tuple(out.hidden_states[i] for i in self.layers)
        return TeacherOut(out.last_hidden_state, states, head.weight, head.bias)


class Trainee(nn.Module):
    """The student (+ hidden-state map): forward -> loss parts, or validation sums with `evaluate=True`."""

    def __init__(self, model: nn.Module, objective: Objective, hidden_map: nn.Linear | None = None):
        super().__init__()
        self.model, self.hidden_map, self.objective = model, hidden_map, objective
        self.family = family_of(model)

    def forward(self, ids: Tensor, mask: Tensor, teacher: TeacherOut | None = None,
                evaluate: bool = False) -> dict[str, Tensor]:  # noqa: D102
        states = bool(self.objective.layer_map) and not evaluate
        with _autocast(ids.device):
            out = get_module(self.model, self.family.base_path)(
                input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=states)
        head = get_module(self.model, self.family.lm_head_path)
        if evaluate:
            return {"sums": validation_sums(out.last_hidden_state, head.weight, head.bias, ids, mask, teacher,
                                            self.objective.chunk_tokens)}
        dt, labels = _compute_dtype(ids.device), next_token_labels(ids, mask)  # (B, S) labels
        hidden, weight = out.last_hidden_state.to(dt), head.weight.to(dt)  # (B, S, H_s), (V, H_s)
        bias = head.bias.to(dt) if head.bias is not None else None
        if teacher is None:
            chunk = self.objective.chunk_tokens
            return {"loss": chunked_ce(hidden.flatten(0, 1), weight, bias, labels.flatten(), chunk)}
        o = self.objective
        t_bias = teacher.bias.to(dt) if teacher.bias is not None else None
        logits = kd_loss(hidden, weight, teacher.hidden.to(dt), teacher.head.to(dt), mask, student_bias=bias,
                         teacher_bias=t_bias, temperature=o.temperature, ce_weight=o.ce_weight, labels=labels,
                         chunk_tokens=o.chunk_tokens)
        if not o.layer_map:
            return {"loss": logits}
        inter = self._intermediate(out.hidden_states, teacher.states, mask)
        alpha = dynamic_alpha(logits, inter)
        total = logits + alpha * inter
        return {"loss": total, "loss_logits": logits, "loss_intermediate": inter, "alpha": alpha}

    def _intermediate(self, states: tuple[Tensor, ...], teacher_states: tuple[Tensor, ...],
                      mask: Tensor) -> Tensor:
        """Sum over the layer map of 1 - cos(hidden_map(student state), teacher state), mean over tokens."""
        pairs = zip(self.objective.layer_map, teacher_states)
        return sum(cosine_loss(self.hidden_map(states[s].float()), t_state, mask)  # (B, S, H_t) each
                   for (s, _), t_state in pairs)

    def count(self, ids: Tensor, mask: Tensor) -> int:
        """Tokens the micro-batch's mean loss divides by: non-padding positions (KD) or targets (CE)."""
        if self.objective.distill:
            return int(mask.sum())
        return int((next_token_labels(ids, mask) != IGNORE_INDEX).sum())


@torch.no_grad()
def validation_sums(hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, mask: Tensor,
                    teacher: TeacherOut | None, chunk: int) -> Tensor:
    """float64 (5,): CE sum, targets, KL(teacher || student) sum, top-1 matches (teacher only), positions."""
    labels = next_token_labels(ids, mask)[mask.bool()]  # (N,)
    h = hidden[mask.bool()]  # (N, H_s)
    h_t = teacher.hidden[mask.bool()] if teacher is not None else None  # (N, H_t)
    sums = torch.zeros(5, dtype=torch.float64, device=hidden.device)
    sums[1], sums[4] = (labels != IGNORE_INDEX).sum(), labels.numel()
    for start in range(0, labels.numel(), chunk):
        log_q = F.log_softmax(F.linear(h[start: start + chunk], weight, bias).float(), dim=-1)  # (c, V)
        targets = labels[start: start + chunk]
        sums[0] += F.nll_loss(log_q, targets, ignore_index=IGNORE_INDEX, reduction="sum").double()
        if teacher is None:
            continue
        t_hidden = h_t[start: start + chunk].to(teacher.head.dtype)
        log_p = F.log_softmax(F.linear(t_hidden, teacher.head, teacher.bias).float(), dim=-1)  # (c, V)
        sums[2] += F.kl_div(log_q, log_p, reduction="sum", log_target=True).double()
        sums[3] += (log_q.argmax(-1) == log_p.argmax(-1)).sum().double()
    return sums


# ---------------------------------------------------------------- one step, validation, saving

def train_step(trainee: Trainee, teacher: Teacher | None, optimizer: torch.optim.Optimizer, rows: Tensor,
               micro: int, tc: TrainConfig, d: Dist) -> dict[str, float]:
    """One optimizer step on this rank's rows (b, S): accumulate micro-batch grads, clip, step; metrics."""
    optimizer.zero_grad(set_to_none=True)
    micros = [(r.to(d.device), torch.ones_like(r, device=d.device)) for r in rows.split(micro)]  # (m, S) each
    counts = [trainee.count(ids, mask) for ids, mask in micros]
    total = float(all_reduce_sum(torch.tensor(float(sum(counts)), dtype=torch.float64), d))
    sums: dict[str, Tensor] = {}
    for (ids, mask), n in zip(micros, counts):
        parts = trainee(ids, mask, teacher(ids, mask) if teacher is not None else None)
        weight = n / total  # the micro-batch's share of the global batch's tokens
        (parts["loss"] * (weight * d.world)).backward()  # FSDP averages gradients over ranks
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value.detach().double() * weight
    norm = torch.nn.utils.clip_grad_norm_(trainee.parameters(), tc.grad_clip or math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    keys = sorted(sums)
    reduced = all_reduce_sum(torch.stack([sums[k] for k in keys]), d).tolist()
    return dict(zip(keys, reduced)) | {"grad_norm": float(norm)}


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
            ids = chunks[min(index, len(chunks) - 1)].to(d.device)  # a spare rank repeats a chunk, weight 0
            mask = torch.ones_like(ids)
            t_out = teacher(ids, mask) if teacher is not None else None
            part = trainee(ids, mask, t_out, evaluate=True)["sums"]
            sums += part.cpu() * (index < len(chunks))
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


def build(student: nn.Module, teacher: nn.Module | None, tc: TrainConfig,
          d: Dist) -> tuple[Trainee, Teacher | None]:
    """The trainee (student + map) and the teacher, on the device, sharded with FSDP2 under torchrun."""
    s_family = family_of(student)
    s_dims = s_family.dims(student.config)
    t_dims = family_of(teacher).dims(teacher.config) if teacher is not None else None
    objective = make_objective(tc, s_dims.layers, t_dims.layers if t_dims else None)
    mapping = hidden_map(s_dims.hidden, t_dims.hidden) if objective.layer_map else None
    if tc.activation_checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
        enable = getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)
        enable({"use_reentrant": False})
    trainee = shard_(Trainee(student, objective, mapping).to(d.device).train(),
                     get_module(student, s_family.layers_path), d)
    if teacher is None:
        return trainee, None
    wrapped = Teacher(teacher, tuple(t for _, t in objective.layer_map)).to(d.device)
    if tc.teacher_sharded:
        shard_(wrapped, get_module(teacher, family_of(teacher).layers_path), d)
    return trainee, wrapped


def fit(student: nn.Module, train_rows: Tensor, val_rows: Tensor, tc: TrainConfig, session: Session,
        teacher: nn.Module | None = None) -> dict[str, Any]:
    """Train `student` on (N, S) train rows (KD from `teacher` when given); checkpoints, best/ and final/."""
    d, out = session.dist, session.out_dir
    micro, total = tc.micro_batch_size or tc.batch_size // d.world, total_steps(tc)
    trainee, teacher_mod = build(student, teacher, tc, d)
    optimizer = make_optimizer(trainee, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total, tc) / tc.lr)
    found = ckpt.latest(out) if session.resume else None
    progress = ckpt.Progress(total_steps=total)
    if found:
        progress = ckpt.resume_(found, trainee, optimizer, scheduler, d)
    log.info("%s at step %d of %d", f"resuming from {found}" if found else "starting", progress.step, total)
    evaluate = functools.partial(_evaluate_, trainee, teacher_mod, val_rows, micro, progress, session)
    metrics = MetricsLog(out, d.is_main, keep_until=progress.step)
    desc = "distill" if teacher is not None else "train"
    bar = tqdm(total=total, initial=progress.step, unit="step", desc=desc,
               disable=not (session.progress and d.is_main), dynamic_ncols=True)
    start, val = time.perf_counter(), {}
    try:
        while progress.step < total:
            tick, lr = time.perf_counter(), scheduler.get_last_lr()[0]
            rows = _rank_rows(train_rows, progress.rows_seen, tc.batch_size, session.seed, d)  # (B/world, S)
            row = train_step(trainee, teacher_mod, optimizer, rows, micro, tc, d)
            scheduler.step()
            progress.step, progress.rows_seen = progress.step + 1, progress.rows_seen + tc.batch_size
            progress.tokens += tc.batch_size * tc.seq_len
            row = {"step": progress.step, "tokens": progress.tokens, **row, "lr": lr,
                   "tokens_per_s": tc.batch_size * tc.seq_len / (time.perf_counter() - tick)}
            if not math.isfinite(row["loss"]):
                raise CompactLMError(f"loss is {row['loss']} at step {progress.step}: try a lower lr")
            last = progress.step == total
            val = evaluate() if _every(progress.step, tc.eval_every) or last else {}
            if _every(progress.step, tc.log_every) or val or last:
                metrics.write(row | val)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            if session.save and (_every(progress.step, tc.save_every) or last):
                ckpt.save_state(out, trainee, optimizer, scheduler, progress, d)
        val = val or evaluate()  # a resumed finished run: evaluate the weights it ends with
        if session.save:
            ckpt.export_(out / "final", trainee, session.tokenizer, d)
    finally:
        bar.close()
        metrics.close()
    best = None if math.isinf(progress.best_val_loss) else progress.best_val_loss
    return {"steps": progress.step, "tokens": progress.tokens, **val, "best_val_loss": best,
            "wall_s": time.perf_counter() - start}


def _rank_rows(train_rows: Tensor, rows_seen: int, batch_size: int, seed: int, d: Dist) -> Tensor:
    """This rank's contiguous slice (B / world, S) of the next global batch of the shuffled stream."""
    order = batch_rows(len(train_rows), rows_seen, batch_size, seed)  # (B,)
    per_rank = batch_size // d.world
    return train_rows[order[d.rank * per_rank: (d.rank + 1) * per_rank]]


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
