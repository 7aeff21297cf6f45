"""What one micro-batch computes: the objective (CE, or KD + CE + cosine on mapped hidden states), the
frozen `Teacher` wrapper, and the `Trainee` (student + hidden-state map) whose forward returns the loss parts.

The student and its `hidden_map` live in one module (`Trainee`), the FSDP root, so that every use of the
root's parameters (embeddings, lm_head, map) happens inside its forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute

from compactlm.config import DistillConfig, TrainConfig
from compactlm.distill.losses import (
    IGNORE_INDEX,
    cosine_loss,
    default_layer_map,
    dynamic_alpha,
    expert_slots,
    kd_loss,
    load_balancing_loss,
    topk_kd_loss,
)
from compactlm.metrics import next_token_labels, token_sums
from compactlm.models.family import family_of, get_module
from compactlm.models.head import head_logits


@dataclass(frozen=True)
class Objective:
    """What a micro-batch's loss is: CE (no teacher) or KD (+CE, + cosine on `layer_map` hidden states)."""

    distill: bool = False
    temperature: float = DistillConfig.temperature  # defaults come from the config schema: one source
    ce_weight: float = DistillConfig.ce_weight
    chunk_tokens: int = DistillConfig.chunk_tokens
    divergence: str = DistillConfig.divergence
    skew: float = DistillConfig.skew
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
    return Objective(True, tc.temperature, tc.ce_weight, tc.chunk_tokens, tc.divergence, tc.skew, tuple(pairs))


def hidden_map(student_hidden: int, teacher_hidden: int, keep: Tensor | None = None) -> nn.Linear:
    """The learned student -> teacher width map, no bias. It starts as the pruning's inverse: student channel j
    is teacher channel keep[j] (the plan's kept hidden channels); without a plan, channel j -> channel j."""
    linear = nn.Linear(student_hidden, teacher_hidden, bias=False)
    with torch.no_grad():
        if keep is None:
            nn.init.eye_(linear.weight)  # (H_t, H_s)
        else:
            linear.weight.zero_()
            linear.weight[keep, torch.arange(student_hidden)] = 1.0
    return linear


def _ce_sum(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, cap: float | None) -> Tensor:
    """Sum of -log softmax(logits)[label] over c rows, the normaliser summed pairwise (`log_softmax_` says why)."""
    logits = head_logits(hidden, weight, bias, cap, torch.float32)  # (c, V)
    return (torch.logsumexp(logits, -1) - logits.gather(1, labels[:, None]).squeeze(1)).sum()


def chunked_ce(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int,
               cap: float | None = None) -> Tensor:
    """Mean CE over labels != IGNORE_INDEX: hidden (N, H), head (V, H), labels (N,); (chunk, V) at a time.
    `cap`: the model's final-logit soft-cap (`head_logits`)."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
    h, y = hidden.index_select(0, rows), labels.index_select(0, rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.numel(), chunk):
        total = total + recompute(_ce_sum, h[start: start + chunk], weight, bias, y[start: start + chunk], cap,
                                  use_reentrant=False)
    return total / max(rows.numel(), 1)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on the device (`precision.autocast_dtype`); nothing when None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _loss_dtype(autocast: torch.dtype | None) -> torch.dtype:
    """The dtype of the chunked loss's head products: the autocast dtype (its softmax and sums stay float32),
    else float32. At a 49,152 vocabulary they weigh: bf16 forwards alone made a CPU KD step 1.16x faster, with the
    head products too 1.57x (`benchmarks/bench_cpu_bf16.py --batch 2`)."""
    return autocast if autocast is not None else torch.float32


class TeacherOut(NamedTuple):
    """What the student's loss needs from the teacher for one micro-batch."""

    hidden: Tensor  # (B, S, H_t) final hidden states (after the final norm)
    states: tuple[Tensor, ...]  # (B, S, H_t) hidden states at the layer map's teacher indices
    head: Tensor  # (V, H_t) lm_head weight
    bias: Tensor | None  # (V,) or None
    cap: float | None = None  # final-logit soft-cap (`Family.logit_cap`)


class SparseTargets(NamedTuple):
    """The teacher's cached top-K targets for one micro-batch (`CachedTeacher`), instead of a `TeacherOut`."""

    logp: Tensor  # (B, S, K) log-probabilities at the distillation temperature
    ids: Tensor  # (B, S, K) their token ids


class CachedTeacher:
    """The teacher as a `TeacherCache`: call(ids, mask, rows) -> SparseTargets at cache positions `rows` (B,)."""

    def __init__(self, cache):
        self.cache = cache

    def __call__(self, ids: Tensor, mask: Tensor, rows: Tensor) -> SparseTargets:
        logp, top = self.cache.get(rows)
        return SparseTargets(logp.to(ids.device), top.to(ids.device))


class Teacher(nn.Module):
    """A frozen teacher in eval mode: forward(ids, mask) -> TeacherOut, without gradients; its forward autocast
    to `autocast` (None: float32)."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...] = (), autocast: torch.dtype | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.layers, self.autocast = layers, autocast
        self.family = family_of(model)

    @torch.no_grad()
    def forward(self, ids: Tensor, mask: Tensor, rows: Tensor | None = None) -> TeacherOut:  # noqa: D102
        with _autocast(ids.device, self.autocast):
            out = get_module(self.model, self.family.base_path)(
                input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=bool(self.layers))
        head = get_module(self.model, self.family.lm_head_path)
        states = tuple(out.hidden_states[i] for i in self.layers)
        return TeacherOut(out.last_hidden_state, states, head.weight, head.bias,
                          self.family.logit_cap(self.model.config))

    def release(self) -> None:
        """Shard again what the last forwards gathered, once their outputs are used: FSDP2 keeps a root's parameters
        (here the final norm and LM head, which the losses read) gathered after forward for a backward that a
        teacher never runs. Between steps every rank then holds its shards only. No-op when not sharded."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self, FSDPModule):
            self.reshard()


class BatchTerms(NamedTuple):
    """What the whole global batch (every micro-batch of every rank) fixes in each micro-batch's loss, so that the
    objective does not depend on how the batch is split (`Trainee` with `sums=True`, then `batch_terms`)."""

    alpha: Tensor | None = None  # () L_logits / L_intermediate of the global batch, detached
    load: Tensor | None = None  # (E,) the global batch's share of routing slots per expert (`expert_slots`)


class Trainee(nn.Module):
    """The student (+ hidden-state map): forward -> loss parts, or validation sums with `evaluate=True`; its
    forward autocast to `autocast` (None: float32)."""

    def __init__(self, model: nn.Module, objective: Objective, hidden_map: nn.Linear | None = None,
                 autocast: torch.dtype | None = None):
        super().__init__()
        self.model, self.hidden_map, self.objective, self.autocast = model, hidden_map, objective, autocast
        self.family = family_of(model)
        # a mixture of experts whose config asks for it (output_router_logits) trains with the load-balancing loss
        self.router = self.family.moe and bool(getattr(model.config, "output_router_logits", False))

    @property
    def global_terms(self) -> bool:
        """The loss has terms that the global batch fixes (`BatchTerms`): the dynamic alpha, the router's load."""
        return bool(self.objective.layer_map) or self.router

    def forward(self, ids: Tensor, mask: Tensor, teacher: TeacherOut | SparseTargets | None = None,
                evaluate: bool = False, batch: BatchTerms | None = None, sums: bool = False) -> dict[str, Tensor]:
        """Loss parts of one micro-batch: the loss, a mean over its tokens, and what it is made of. `batch`: the
        global batch's terms (None: this micro-batch is the whole batch). `sums`: `_batch_sums` instead (through
        forward, so that an FSDP root gathers its parameters for it)."""
        if sums:
            return self._batch_sums(ids, mask, teacher)
        batch = batch or BatchTerms()
        out = self._run(ids, mask, states=bool(self.objective.layer_map) and not evaluate,
                        router=self.router and not evaluate)
        parts = self._loss_parts(out, ids, mask, teacher, evaluate, batch)
        if self.router and not evaluate:
            parts = parts | self._router_loss(out.router_logits, mask, parts["loss"], batch.load)
        return parts

    @torch.no_grad()
    def _batch_sums(self, ids: Tensor, mask: Tensor, teacher: TeacherOut | None) -> dict[str, Tensor]:
        """This micro-batch's share of what `batch_terms` needs, as float64 sums to add over micro-batches and
        ranks: the logit and intermediate losses times its tokens; routing slots per expert and routed rows."""
        out = self._run(ids, mask, states=bool(self.objective.layer_map), router=self.router)
        sums = {}
        if self.objective.layer_map:
            parts, tokens = self._loss_parts(out, ids, mask, teacher, False, BatchTerms()), mask.sum().double()
            sums |= {"logits": parts["loss_logits"].double() * tokens,
                     "intermediate": parts["loss_intermediate"].double() * tokens}
        if self.router:
            slots, rows = expert_slots(out.router_logits, self.family.dims(self.model.config).top_k, mask)
            sums |= {"slots": slots.double(), "rows": rows.double()}
        return sums

    def _run(self, ids: Tensor, mask: Tensor, states: bool, router: bool):
        """The student's base model (no LM head) on one micro-batch, with the hidden states / router logits."""
        with _autocast(ids.device, self.autocast):
            return get_module(self.model, self.family.base_path)(
                input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=states,
                **({"output_router_logits": True} if router else {}))

    def _router_loss(self, router_logits: tuple[Tensor, ...], mask: Tensor, loss: Tensor,
                     load: Tensor | None) -> dict[str, Tensor]:
        """The load-balancing loss as the model's ForCausalLM adds it (`load_balancing_loss`), weighted by
        `router_aux_loss_coef` into the total; `load`: the global batch's expert load."""
        config = self.model.config
        aux = load_balancing_loss(router_logits, self.family.dims(config).top_k, mask, load)
        return {"loss": loss + config.router_aux_loss_coef * aux.to(loss.device), "loss_router": aux.detach()}

    def _loss_parts(self, out, ids: Tensor, mask: Tensor, teacher: TeacherOut | SparseTargets | None,
                    evaluate: bool, batch: BatchTerms) -> dict[str, Tensor]:
        """The objective's parts from the base model's output `out` (see `forward`)."""
        head = get_module(self.model, self.family.lm_head_path)
        cap = self.family.logit_cap(self.model.config)
        if evaluate:
            t_hidden, t_head = (None, None) if teacher is None else (
                teacher.hidden, (teacher.head, teacher.bias, teacher.cap))
            return {"sums": token_sums(out.last_hidden_state, (head.weight, head.bias, cap), ids, mask, t_hidden,
                                       t_head, self.objective.chunk_tokens)}
        dt, labels = _loss_dtype(self.autocast), next_token_labels(ids, mask)  # (B, S) labels
        hidden, weight = out.last_hidden_state.to(dt), head.weight.to(dt)  # (B, S, H_s), (V, H_s)
        bias = head.bias.to(dt) if head.bias is not None else None
        o = self.objective
        ce = lambda: chunked_ce(hidden.flatten(0, 1), weight, bias, labels.flatten(), o.chunk_tokens, cap)  # noqa: E731
        if teacher is None:
            return {"loss": ce()}
        if isinstance(teacher, SparseTargets):
            loss = topk_kd_loss(hidden, weight, teacher.logp, teacher.ids, mask, student_bias=bias,
                                temperature=o.temperature, chunk_tokens=o.chunk_tokens, student_cap=cap)
            return {"loss": loss + o.ce_weight * ce() if o.ce_weight else loss}
        t_bias = teacher.bias.to(dt) if teacher.bias is not None else None
        logits = kd_loss(hidden, weight, teacher.hidden.to(dt), teacher.head.to(dt), mask, student_bias=bias,
                         teacher_bias=t_bias, temperature=o.temperature, ce_weight=o.ce_weight, labels=labels,
                         chunk_tokens=o.chunk_tokens, student_cap=cap, teacher_cap=teacher.cap,
                         divergence=o.divergence, skew=o.skew)
        if not o.layer_map:
            return {"loss": logits}
        inter = self._intermediate(out.hidden_states, teacher.states, mask)
        alpha = dynamic_alpha(logits, inter) if batch.alpha is None else batch.alpha.to(logits)
        total = logits + alpha * inter
        return {"loss": total, "loss_logits": logits, "loss_intermediate": inter, "alpha": alpha}

    def _intermediate(self, states: tuple[Tensor, ...], teacher_states: tuple[Tensor, ...],
                      mask: Tensor) -> Tensor:
        """Sum over the layer map of 1 - cos(hidden_map(student state), teacher state), mean over tokens."""
        pairs = zip(self.objective.layer_map, teacher_states)
        dtype = self.hidden_map.weight.dtype  # float32, or the dtype a mixed-precision policy gathers it in
        return sum(cosine_loss(self.hidden_map(states[s].to(dtype)), t_state, mask)  # (B, S, H_t) each
                   for (s, _), t_state in pairs)

    def count(self, ids: Tensor, mask: Tensor) -> int:
        """Tokens the micro-batch's mean loss divides by: non-padding positions (KD) or targets (CE)."""
        if self.objective.distill:
            return int(mask.sum())
        return int((next_token_labels(ids, mask) != IGNORE_INDEX).sum())


def batch_terms(sums: dict[str, Tensor]) -> BatchTerms:
    """The global batch's terms from the `Trainee`'s sums (`sums=True`) added over every micro-batch and rank:
    alpha is the ratio of the two token-weighted losses (the ratio of their global means), the load the share of
    routing slots."""
    alpha = dynamic_alpha(sums["logits"], sums["intermediate"]) if "logits" in sums else None
    load = sums["slots"] / sums["rows"] if "slots" in sums else None
    return BatchTerms(alpha, load)
