"""Reconstruction after pruning (`prune.reconstruct`): refit the projections around the cut by ridge least
squares, so that each pruned layer's projections reproduce the teacher's outputs on calibration text.

For a teacher projection y = W x + b, and the student's copy of it that keeps input channels K and output
rows R, the refit is

    W', b' = argmin  sum_t || y_t[R] - W' z_t - b' ||^2  +  lam ||W'||^2,      lam = ridge * mean(diag G)

over the calibration tokens t, where y_t is the teacher's output on the teacher's own input, and z_t is the
student's input, chosen by `inputs`:
- "sequential": z_t is what the student itself computes at that projection, with every earlier projection
  (earlier layers, and earlier projections of the same layer) already refitted: the errors of the cut do not
  accumulate unseen (GPTQ/SparseGPT-style sequential calibration). Targets stay the teacher's.
- "teacher": z_t = x_t[K], the teacher's input restricted to the kept channels (the student never runs).

Which projections (`sites`):
- "outputs": the projections that consume pruned units: the attention output projection (heads) and the MLP
  down projection (neurons). Their kept input columns absorb what the pruned heads and neurons contributed.
- "all": also the projections that read the residual stream (q/k/v, gate/up): the equivalent for pruned
  hidden channels. The residual stream itself has no projection to refit (it is an identity path), but its
  readers can be refitted to the kept channels, as renormalised by the student's smaller norm.

The layers run layer-major on captured inputs, as in models/layerwise.py: per kept layer the teacher runs once
(keeping its targets, at the kept output rows and real tokens, until the layer is fitted), and from sequential
inputs the student runs once per stage of projections and once more to move on (its attention, once fitted, is
recorded and replayed rather than run again). Statistics accumulate in
float64 (G = sum z z^T, C = sum y z^T, padding excluded; projections that read the same input, q/k/v or
gate/up, share one G and its Cholesky factor), and the solve runs in float64. The attention output's G is badly
conditioned (condition numbers of 2e7 to 3e8 on the tests' tiny Gemma 2): float32 sums put noise of about
1e-7 x |G| into exactly the directions that a small ridge leaves to the data, and no ridge made a keep-all refit
exact (1e-3 to 2e-3 away from the teacher's logits; float64 with a relative ridge of 1e-12: 4e-7). A bias is fitted as a constant input column without
penalty. One layer's statistics exist at a time (a 14336-wide MLP's G is 1.6 GB),
and the refitted weights are ordinary weights: the checkpoint stays plain.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from compactlm.config import PruneConfig
from compactlm.errors import CompactLMError
from compactlm.models.family import Dims, Family, family_of, get_module
from compactlm.models.layerwise import capture_layer_calls, model_inputs
from compactlm.pruning.plan import Plan
from compactlm.pruning.surgery import axis_index, rescale_for, rescale_queries

log = logging.getLogger(__name__)

DEFAULTS = PruneConfig()
# A projection with k inputs is refitted only from at least 4k calibration tokens: with fewer, the least-squares
# fit follows the calibration text rather than the layer (SmolLM2 cut to ffn 1072 from 8 x 64 tokens: perplexity
# 389 refitted against 46 sliced), and the sliced weights stay.
MIN_TOKENS_PER_INPUT = 4
SITES = ("none", "outputs", "all")
STATS_DTYPE = torch.float64  # G and C (the module docstring says why; benchmarks/bench_refit.py measures float32)
INPUTS = ("sequential", "teacher")


def ridge_factor(gram: Tensor, ridge: float, bias: bool) -> tuple[Tensor, bool]:
    """G + lam D in float64, factorised once for every projection that shares G: (its Cholesky factor, True), or
    (the matrix, False) in the rare case it is not numerically positive definite. D is the identity except the
    last entry when `bias` (the constant column, not penalised)."""
    g = gram.double()
    k = g.shape[0]
    weight_part = k - 1 if bias else k
    lam = ridge * float(g.diagonal()[:weight_part].mean()) if weight_part else 0.0
    penalty = torch.ones(k, dtype=torch.float64)
    if bias:
        penalty[-1] = 0.0
    a = g + torch.diag(penalty * max(lam, 1e-12))
    factor, info = torch.linalg.cholesky_ex(a)
    return (factor, True) if int(info) == 0 else (a, False)


def ridge_fit(gram: Tensor, cross: Tensor, ridge: float, bias: bool,
              factor: tuple[Tensor, bool] | None = None) -> Tensor:
    """Solve W (G + lam D) = C for W in float64: G (k, k) = sum z z^T, C (out, k) = sum y z^T (see ridge_factor;
    pass its result as `factor` to reuse it). Returns (out, k) float64."""
    matrix, cholesky = factor or ridge_factor(gram, ridge, bias)
    c = cross.double().T  # G is symmetric: (G + lam D) W^T = C^T
    return (torch.cholesky_solve(c, matrix) if cholesky else torch.linalg.solve(matrix, c)).T


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 projection: weight stored (in, out)


def _stages(family: Family, sites: str) -> list[tuple[str, ...]]:
    """Projection paths inside one layer, in forward order: [attention reads], [attention output], [MLP reads],
    [MLP output] ("outputs": the two output projections only). A mixture of experts refits its attention only:
    its experts and router are kept as they were sliced."""
    attn_reads, mlp_reads = family.reads()
    attn, mlp = [attn_reads, (family.attn_out_path,)], [mlp_reads, (family.mlp_out_path,)]
    if family.moe:
        mlp = []
    if sites == "outputs":
        return attn[1:] + mlp[1:]
    return [s for s in attn + mlp if s]


class _Gram:
    """Float64 G = sum z z^T over real tokens, shared by the projections of a stage that read the same input
    (q/k/v; gate/up): summed once per batch and factorised once."""

    def __init__(self, k: int, bias: bool, device: torch.device):
        self.bias = bias
        self.sum = torch.zeros(k + int(bias), k + int(bias), dtype=STATS_DTYPE, device=device)
        self.factor: tuple[Tensor, bool] | None = None

    def solve(self, cross: Tensor, ridge: float) -> Tensor:
        if self.factor is None:
            self.factor = ridge_factor(self.sum, ridge, self.bias)
        return ridge_fit(self.sum, cross, ridge, self.bias, self.factor)


class _Fit:
    """Float64 sums for one projection: G = sum z z^T (its own, or one it shares) and C = sum y z^T."""

    def __init__(self, k: int, out: int, bias: bool, device: torch.device):
        self.bias = bias
        self.gram, self.owns_gram = _Gram(k, bias, device), True
        self.cross = torch.zeros(out, k + int(bias), dtype=STATS_DTYPE, device=device)
        self.tokens = 0

    def share(self, other: _Fit) -> None:
        """Use `other`'s G (same inputs): it sums them, this fit adds only its own C."""
        self.gram, self.owns_gram = other.gram, False

    def add_(self, z: Tensor, y: Tensor) -> None:
        """z (T, k) student inputs, y (T, out) teacher outputs, real tokens only."""
        z, y = z.to(self.cross.dtype), y.to(self.cross.dtype)
        if self.bias:
            z = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], 1)
        if self.owns_gram:
            self.gram.sum.addmm_(z.T, z)
        self.cross.addmm_(y.T, z)
        self.tokens += z.shape[0]


def _share_grams(stage: list) -> None:
    """Projections of one stage with the same kept inputs and bias share one G."""
    for i, site in enumerate(stage):
        for earlier in stage[:i]:
            if earlier.fit.owns_gram and earlier.fit.bias == site.fit.bias and torch.equal(earlier.keep_in, site.keep_in):
                site.fit.share(earlier.fit)
                break


class _Done(Exception):
    """Raised by the last hook of a stage: the rest of the student's layer need not run for this batch."""


class _Stage:
    """Counts a stage's hooks within one batch; once every projection of the stage has seen its input, stops
    the student's layer (the attention reads need only the first norm, the MLP reads only the second)."""

    def __init__(self, size: int):
        self.size, self.count = size, 0

    def seen(self) -> None:
        self.count += 1
        if self.count == self.size:
            self.count = 0
            raise _Done


class _Site:
    """One projection of one layer: teacher and student modules, the kept input and output indices, the teacher's
    target outputs of each batch (sequential) and the running sums."""

    def __init__(self, path: str, family: Family, plan: Plan, dims: Dims, i: int, teacher_layer, student_layer):
        self.path = path
        self.teacher, self.student = get_module(teacher_layer, path), get_module(student_layer, path)
        axes = family.layer_params[path + ".weight"]
        self.conv1d = _is_conv1d(self.teacher)
        in_label, out_label = (axes[0], axes[1]) if self.conv1d else (axes[1], axes[0])
        self.out_label = out_label
        self.keep_in = axis_index(in_label, plan, i, dims)
        self.keep_out = axis_index(out_label, plan, i, dims)
        bias = getattr(self.student, "bias", None) is not None
        self.fit = _Fit(len(self.keep_in), len(self.keep_out), bias, self.student.weight.device)
        self.targets: list[Tensor] = []  # per batch: (real tokens, kept outputs)
        self.z: Tensor | None = None  # the input seen by the last hook call

    def watch_teacher(self, real: list[Tensor], from_teacher: bool):
        """Hook: the teacher's kept outputs at real tokens become this batch's targets; fitting from the
        teacher's inputs, its kept input channels are folded into the sums at once."""

        def hook(module, args, output):
            mask = real[len(self.targets)].to(output.device)
            y = output.detach()[mask].index_select(-1, self.keep_out.to(output.device))
            if from_teacher:
                z = args[0].detach()[mask].index_select(-1, self.keep_in.to(output.device))
                self.fit.add_(z, y.to(self.fit.cross.device))
                y = y[:0]  # nothing to keep
            self.targets.append(y)

        return self.teacher.register_forward_hook(hook)

    def watch_student(self, real: list[Tensor], stage: _Stage):
        """Pre-hook: the student's input at real tokens, folded into the sums against the batch's targets."""
        seen = [0]

        def hook(module, args):
            b = seen[0]
            seen[0] += 1
            z = args[0].detach()[real[b].to(args[0].device)]
            self.fit.add_(z, self.targets[b].to(self.fit.cross.device))
            stage.seen()

        return self.student.register_forward_pre_hook(hook)


    def apply(self, ridge: float, query_scale: float, q_width: int) -> int:
        """Solve, write the refitted weight (and bias) into the student's projection; the tokens it was fitted on
        (0: too few tokens for its inputs, the sliced weights stay)."""
        k = self.fit.cross.shape[1]
        if self.fit.tokens < MIN_TOKENS_PER_INPUT * k:
            self.fit, self.targets = None, []
            return 0
        w = self.fit.gram.solve(self.fit.cross, ridge)
        weight, bias = (w[:, :-1], w[:, -1]) if self.fit.bias else (w, None)
        weight_axes = (None, self.out_label) if self.conv1d else (self.out_label, None)
        weight = weight.T if self.conv1d else weight
        with torch.no_grad():
            target = self.student.weight
            target.copy_(rescale_queries(weight, weight_axes, query_scale, q_width).to(target.dtype))
            if bias is not None:
                b = rescale_queries(bias, (self.out_label,), query_scale, q_width)
                self.student.bias.copy_(b.to(self.student.bias.dtype))
        tokens = self.fit.tokens
        self.fit, self.targets = None, []  # free G, C and the targets before the next site
        return tokens


class _Replay:
    """The student's attention outputs of one layer, once its attention projections are all fitted: recorded in
    the next student pass, replayed in the passes after it (the MLP stages do not change them), so the attention
    of a layer runs twice instead of four times. A pass that does not record every batch is not replayed."""

    def __init__(self, module: nn.Module, batches: int):
        self.module, self.batches, self.outputs = module, batches, []

    def hooks(self) -> list:
        """For one pass over the batches: a hook that records, or a replacement of the module's forward."""
        if len(self.outputs) < self.batches:
            self.outputs.clear()
            return [self.module.register_forward_hook(lambda module, args, out: self.outputs.append(out))]
        replay = iter(self.outputs)
        self._own = self.module.__dict__.get("forward")  # a forward set on the instance (accelerate's hooks)
        self.module.forward = lambda *args, **kwargs: next(replay)
        return [self]

    def remove(self) -> None:  # undo the replacement, as a hook handle's remove() would
        if self._own is None:
            del self.module.forward
        else:
            self.module.forward = self._own


def _layer_call(layer: nn.Module, state: Tensor, call: tuple) -> Tensor:
    args, kwargs = call
    out = layer(state, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _run_layer(layer: nn.Module, states, calls: list[dict[int, tuple]], i: int, hooks: list, advance: bool) -> None:
    """Every batch through `layer` (index i in `calls`) with `hooks` registered; `advance`: keep the outputs as
    the next layer's states."""
    try:
        for b in range(len(states)):
            try:
                out = _layer_call(layer, states[b], calls[b][i])
            except _Done:  # a stage's inputs are all seen: the rest of the layer is not needed
                continue
            if advance:
                states[b] = out
    finally:
        for h in hooks:
            h.remove()


def reconstruct(teacher: nn.Module, student: nn.Module, plan: Plan, batches: Iterable[dict[str, Tensor]], *,
                sites: str = DEFAULTS.reconstruct, inputs: str = DEFAULTS.reconstruct_inputs,
                ridge: float = DEFAULTS.ridge, progress: bool = False) -> dict:
    """Refit the student's projections in place (see the module docstring); the teacher is not changed.

    `student` is `teacher` pruned by `plan`. Per kept layer, the teacher runs once (its targets are kept, at the
    kept output rows, until the layer is fitted); from sequential inputs the student runs once per stage of
    projections and once more to move on. Returns {"sites": projections refitted, "tokens": per fit}."""
    from tqdm.auto import tqdm

    if sites not in SITES or sites == "none":
        raise CompactLMError(f"prune.reconstruct must be one of {', '.join(SITES[1:])} here, not '{sites}'")
    if inputs not in INPUTS:
        raise CompactLMError(f"unknown prune.reconstruct_inputs '{inputs}' (choose {', '.join(INPUTS)})")
    family = family_of(teacher)
    dims = family.dims(teacher.config)
    q_width = plan.dims(dims).heads * dims.head_dim
    sequential = inputs == "sequential"
    attention = family.attn_out_path.rpartition(".")[0]  # the module whose output the o_proj stage completes
    t_layers, s_layers = get_module(teacher, family.layers_path), get_module(student, family.layers_path)
    kept = plan.layers.tolist()
    scaled = rescale_for(family, teacher.config, plan).layer_index
    device = get_module(teacher, family.embed_path).weight.device
    batches = [model_inputs(b, device) for b in batches]
    real = [b["attention_mask"].bool() for b in batches]
    fitted, tokens, skipped = 0, 0, []
    was = teacher.training, student.training
    teacher.eval()
    student.eval()
    t_states = s_states = None
    try:
        with torch.no_grad():
            t_states, t_calls = capture_layer_calls(teacher, batches)
            s_states, s_calls = capture_layer_calls(student, batches) if sequential else (None, None)
            for i in tqdm(range(dims.layers), desc="reconstruct", unit="layer", disable=not progress):
                if i not in kept:  # a dropped layer: the teacher's states move on, the student has none
                    _run_layer(t_layers[i], t_states, t_calls, i, [], advance=True)
                    continue
                j = kept.index(i)
                stages = [[_Site(p, family, plan, dims, i, t_layers[i], s_layers[j]) for p in stage]
                          for stage in _stages(family, sites)]
                for stage in stages:
                    _share_grams(stage)
                every = [site for stage in stages for site in stage]
                _run_layer(t_layers[i], t_states, t_calls, i, [s.watch_teacher(real, not sequential) for s in every],
                           advance=True)
                scale = (j + 1) / (i + 1) if scaled else 1.0
                replay = None  # the student's attention outputs, from the pass after its last attention stage
                for stage in stages:
                    if sequential:  # the student's inputs at this stage, earlier stages already refitted
                        counter = _Stage(len(stage))
                        _run_layer(s_layers[j], s_states, s_calls, j, [s.watch_student(real, counter) for s in stage]
                                   + (replay.hooks() if replay else []), advance=False)
                    used = [site.apply(ridge, scale, q_width) for site in stage]
                    fitted += sum(1 for t in used if t)
                    skipped += [site.path for site, t in zip(stage, used) if not t]
                    tokens = max(used + [tokens])
                    if family.attn_out_path in {site.path for site in stage}:
                        replay = _Replay(get_module(s_layers[j], attention), len(batches))
                if sequential:  # the student's states through its refitted layer
                    _run_layer(s_layers[j], s_states, s_calls, j, replay.hooks() if replay else [], advance=True)
    finally:
        for states in (t_states, s_states):
            if states is not None:
                states.close()
        teacher.train(was[0])
        student.train(was[1])
    log.info("reconstruct: %d projections refitted by ridge least squares on %d tokens each (%s inputs)",
             fitted, tokens, inputs)
    if skipped:
        log.warning("reconstruct: %d projections (%s) kept their sliced weights: fewer than %d calibration tokens "
                    "per input; raise calib.sequences", len(skipped), ", ".join(sorted(set(skipped))),
                    MIN_TOKENS_PER_INPUT)
    return {"sites": fitted, "tokens": tokens, "skipped": len(skipped)}
