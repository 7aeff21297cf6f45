"""Evaluation: perplexity, agreement with a teacher (KL, top-1), generation speed, sample text.

Batches are an iterable of {"input_ids": (B, S) long, "attention_mask": (B, S) long}, mask 0 = padding.
Every metric walks the batches once: the decoder gives the final hidden states (B, S, H); the tokens that
count are gathered into (N, H) and the LM head runs on chunks of `chunk_tokens` of them, so a (N, V) float32
logit tensor never exists at once. Sums are float64 on the CPU and every mean is weighted by token counts, so
results do not depend on how the tokens are split into batches.

Next-token loss: logits[:, :-1] predict ids[:, 1:]; a target counts only when both its position and the
predicting position are unmasked. KL(teacher || student) and top-1 agreement are averaged over every
non-padding position (its next-token distribution), including the last one of each row.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from compactlm.errors import CompactLMError
from compactlm.models.family import family_of, get_module
from compactlm.models.head import head_logits, log_softmax_
from compactlm.models.layerwise import Layerwise, skeleton
from compactlm.models.params import num_params, params_of_config

log = logging.getLogger(__name__)

CHUNK_TOKENS = 2048  # positions whose (chunk, V) logits exist at once during evaluation
IGNORE_INDEX = -100  # a target that counts for nothing (torch's cross_entropy default)
Batch = Mapping[str, Tensor]
Head = tuple[Tensor, "Tensor | None", "float | None"]  # an LM head: weight (V, H), bias (V,) or None, soft-cap

__all__ = ["perplexity", "teacher_agreement", "generation_speed", "generation_speeds", "evaluate", "sample_text"]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(*models) -> Iterator[None]:
    """Put models in eval mode under inference_mode; restore each one's training flag afterwards."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


def _head(model) -> Head:
    """The LM head's (weight (V, H), bias (V,) or None, soft-cap or None) of a loaded model or a `Layerwise`."""
    net = skeleton(model)
    family = family_of(net)
    cap = family.logit_cap(net.config)
    if isinstance(model, Layerwise):
        return (*model.head(), cap)
    module = get_module(model, family.lm_head_path)
    return module.weight, module.bias, cap


def vocab_size(model) -> int:
    net = skeleton(model)
    return int(get_module(net, family_of(net).lm_head_path).weight.shape[0])


def _hidden(model, ids: Tensor, mask: Tensor) -> Tensor:
    """Final hidden states after the final norm: (B, S, H) in the model's dtype, on its device."""
    base = get_module(model, family_of(model).base_path)
    device = _device(model)
    out = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.last_hidden_state


def next_token_labels(ids: Tensor, mask: Tensor) -> Tensor:
    """(B, S) labels: ids[:, 1:] where both positions are unmasked, else IGNORE_INDEX (last column too)."""
    keep = mask[:, :-1].bool() & mask[:, 1:].bool()  # (B, S-1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(keep, ids[:, 1:], IGNORE_INDEX)
    return labels


@torch.no_grad()
def token_sums(hidden: Tensor, head: Head, ids: Tensor, mask: Tensor, teacher_hidden: Tensor | None = None,
               teacher_head: Head | None = None, chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """float64 (5,): CE sum (nats), targets, KL(teacher || student) sum, top-1 matches, positions.

    hidden (B, S, H_s) final states, teacher_hidden (B, S, H_t). Without a teacher only the positions with a
    target are computed; with one, every non-padding position (its next-token distribution) counts.
    The LM heads run on `chunk_tokens` positions at a time: a full (N, V) logit tensor never exists.
    """
    labels = next_token_labels(ids, mask)
    rows = mask.bool() if teacher_hidden is not None else labels != IGNORE_INDEX  # (B, S) positions
    dev = hidden.device
    h_s, targets = hidden[rows.to(dev)], labels[rows].to(dev)  # (N, H_s), (N,)
    h_t = teacher_hidden[rows.to(teacher_hidden.device)] if teacher_hidden is not None else None  # (N, H_t)
    sums = torch.zeros(5, dtype=torch.float64, device=dev)
    sums[1], sums[4] = (targets != IGNORE_INDEX).sum(), targets.numel()
    for start in range(0, targets.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        log_q = log_softmax_(head_logits(h_s[part], *head, torch.float32))  # (c, V) student
        sums[0] += F.nll_loss(log_q, targets[part], ignore_index=IGNORE_INDEX, reduction="sum").double()
        if h_t is None:
            continue
        log_p = log_softmax_(head_logits(h_t[part].to(teacher_head[0].dtype), *teacher_head, torch.float32)).to(dev)
        sums[2] += F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).double().sum()  # rows: see losses
        sums[3] += (log_q.argmax(-1) == log_p.argmax(-1)).sum().double()
    return sums


def _final_states(model, batches: list[Batch], progress: bool) -> dict[int, Tensor] | None:
    """A `Layerwise`'s final hidden states of every batch (its layers run one at a time); None otherwise."""
    if not isinstance(model, Layerwise):
        return None
    return dict(enumerate(model.final_hidden(batches, progress=progress)))


def _scan(model, teacher, batches: Iterable[Batch], chunk_tokens: int, progress: bool,
          teacher_cache: dict[int, Tensor] | None = None) -> dict[str, float]:
    """One pass over `batches`: loss/perplexity/tokens, plus kl/top1_agreement when a teacher is given.

    `teacher_cache`: batch index -> the teacher's final hidden states, filled on first use; pass the same
    dict to evaluate several students on the same batches with one teacher pass. Either model may be a
    `Layerwise`: its final hidden states come from one layer-by-layer pass over all batches first."""
    if chunk_tokens < 1:
        raise CompactLMError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if teacher is not None and vocab_size(teacher) != vocab_size(model):
        raise CompactLMError(
            f"teacher vocabulary size {vocab_size(teacher)} != student vocabulary size {vocab_size(model)}: "
            "KL needs the same tokenizer")
    batches = list(batches)
    states = _final_states(model, batches, progress) or {}
    keep = teacher_cache is not None
    teacher_cache = teacher_cache if keep else {}
    if not teacher_cache:
        teacher_cache |= _final_states(teacher, batches, progress) or {}
    head, head_t = _head(model), _head(teacher) if teacher is not None else None
    sums = torch.zeros(5, dtype=torch.float64)
    models = tuple(skeleton(m) for m in (model, teacher) if m is not None)
    with _eval_mode(*models):
        for i, batch in enumerate(tqdm(batches, desc="evaluate", disable=not progress, leave=False)):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            h_t = teacher_cache.get(i)
            if teacher is not None and h_t is None:
                h_t = _hidden(teacher, ids, mask)
                if keep:
                    teacher_cache[i] = h_t
            h_s = states.pop(i) if i in states else _hidden(model, ids, mask)
            sums += token_sums(h_s, head, ids, mask, h_t, head_t, chunk_tokens).cpu()
    ce, targets, kl, top1, positions = sums.tolist()
    if targets == 0:
        raise CompactLMError("evaluation batches hold no non-padding target tokens (rows need 2+)")
    out = {"loss": ce / targets, "perplexity": math.exp(min(ce / targets, 700.0)), "tokens": int(targets)}
    if teacher is not None:
        out |= {"kl": kl / positions, "top1_agreement": top1 / positions}
    return out


def perplexity(model, batches: Iterable[Batch], *, progress: bool = False) -> dict:
    """{"loss": mean next-token CE (nats/token), "perplexity": exp(loss), "tokens": targets counted}."""
    return _scan(model, None, batches, CHUNK_TOKENS, progress)


def teacher_agreement(student, teacher, batches: Iterable[Batch], *, chunk_tokens: int = CHUNK_TOKENS,
                      progress: bool = False) -> dict:
    """{"kl": mean KL(teacher || student) per non-padding token (nats), "top1_agreement": match rate}."""
    out = _scan(student, teacher, batches, chunk_tokens, progress)
    return {"kl": out["kl"], "top1_agreement": out["top1_agreement"]}


SPEED_MODES = ("dynamic", "static", "compiled")  # KV cache: dynamic; static; static + torch.compile


def _generate(model, tokenizer, prompt: str, new_tokens: int, exact: bool, batch: int = 1,
              mode: str = "dynamic") -> tuple[Tensor, int]:
    """Greedy generate with a KV cache for `batch` copies of the prompt: (batch, P + n) ids and the prompt
    length P. `mode`: the cache (SPEED_MODES); "compiled" lets generate torch.compile the forward, on CPU too."""
    from transformers import CompileConfig

    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"].to(_device(model)).expand(batch, -1)
    if ids.shape[1] == 0:
        raise CompactLMError(f"prompt {prompt!r} tokenizes to no tokens")
    pad = tokenizer.pad_token_id
    if pad is None:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    cache = {"disable_compile": True} if mode == "dynamic" else {"cache_implementation": "static"}
    if mode == "static":
        cache["disable_compile"] = True  # on CUDA, generate would compile a static cache's forward by itself
    elif mode == "compiled":
        config = CompileConfig(mode="default")
        config._compile_all_devices = True  # generate compiles only on accelerators unless asked
        cache["compile_config"] = config
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if exact else None, do_sample=False, use_cache=True, pad_token_id=pad,
        temperature=None, top_p=None, top_k=None, **cache,  # greedy: ignore sampling defaults
    )
    return out, ids.shape[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_speed(model, tokenizer, *, prompt: str = "The", new_tokens: int = 64,
                     repeats: int = 2, batch: int = 1, mode: str = "dynamic") -> dict:
    """{"tokens_per_s": greedy decode rate: `batch` sequences, `mode` KV cache, `new_tokens` a run, after a
    warm-up (which also compiles, in mode "compiled")}."""
    if new_tokens < 1 or repeats < 1 or batch < 1:
        raise CompactLMError(f"generation_speed: need new_tokens, repeats, batch >= 1, got {new_tokens}, {repeats}, {batch}")
    if mode not in SPEED_MODES:
        raise CompactLMError(f"generation_speed: mode {mode!r} is not one of {', '.join(SPEED_MODES)}")
    device = _device(model)
    with _eval_mode(model):
        _generate(model, tokenizer, prompt, new_tokens, True, batch, mode)  # warm-up: kernels, allocator, compile
        produced, elapsed = 0, 0.0
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out, prompt_len = _generate(model, tokenizer, prompt, new_tokens, True, batch, mode)
            _sync(device)
            elapsed += time.perf_counter() - start
            produced += out[:, prompt_len:].numel()
    return {"tokens_per_s": produced / max(elapsed, 1e-9)}


def generation_speeds(model, tokenizer, modes: Iterable[str] = ("dynamic",), batches: Iterable[int] = (1,),
                      new_tokens: int = 64) -> dict:
    """{"tokens_per_s": dynamic cache at batch 1 (when measured), "speeds": {"<mode> b<batch>": tokens/s}}; a
    mode that fails here (torch.compile without a working compiler) is None, with a warning."""
    speeds = {}
    for mode in modes:
        for batch in batches:
            try:
                speeds[f"{mode} b{batch}"] = generation_speed(model, tokenizer, batch=batch, mode=mode,
                                                               new_tokens=new_tokens)["tokens_per_s"]
            except CompactLMError:
                raise
            except Exception as e:  # compile errors come from many places
                log.warning("generation speed, %s at batch %d: failed (%s)", mode, batch, str(e).splitlines()[0])
                speeds[f"{mode} b{batch}"] = None
    out = {"speeds": speeds}
    if speeds.get("dynamic b1") is not None:
        out["tokens_per_s"] = speeds["dynamic b1"]
    return out


def sample_text(model, tokenizer, prompt: str, *, new_tokens: int = 40) -> str:
    """The greedy continuation of `prompt` (prompt excluded): <= `new_tokens` tokens, no specials."""
    with _eval_mode(model):
        out, prompt_len = _generate(model, tokenizer, prompt, new_tokens, exact=False)
    return tokenizer.decode(out[0, prompt_len:].tolist(), skip_special_tokens=True)


def evaluate(model, batches: Iterable[Batch], *, teacher=None, tokenizer=None, speed: bool = True,
             progress: bool = False, teacher_cache: dict[int, Tensor] | None = None,
             speed_modes: Iterable[str] = ("dynamic",), speed_batches: Iterable[int] = (1,),
             speed_tokens: int = 64) -> dict:
    """params, loss, perplexity, tokens; + kl, top1_agreement (teacher); + tokens_per_s and speeds (speed,
    tokenizer; every mode of `speed_modes` at every batch size of `speed_batches`, `speed_tokens` a run).

    `teacher_cache` (a dict shared between calls on the same batches) keeps the teacher's hidden states."""
    params = params_of_config(model.model.config) if isinstance(model, Layerwise) else num_params(model)
    out = {"params": params} | _scan(model, teacher, batches, CHUNK_TOKENS, progress, teacher_cache)
    if speed and tokenizer is not None and isinstance(model, Layerwise):
        log.info("evaluation: no generation speed layer by layer (the model does not fit in memory_gb)")
    elif speed and tokenizer is not None:
        out |= generation_speeds(model, tokenizer, speed_modes, speed_batches, speed_tokens)
    log.info("evaluation: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()})
    return out
