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
from compactlm.models.loading import num_params

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
Batch = Mapping[str, Tensor]

__all__ = ["perplexity", "teacher_agreement", "generation_speed", "evaluate", "sample_text"]


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


def _head(model) -> torch.nn.Module:
    return get_module(model, family_of(model).lm_head_path)


def _vocab(model) -> int:
    return int(_head(model).weight.shape[0])


def _hidden(model, ids: Tensor, mask: Tensor) -> Tensor:
    """Final hidden states after the final norm: (B, S, H) in the model's dtype, on its device."""
    base = get_module(model, family_of(model).base_path)
    device = _device(model)
    out = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.last_hidden_state


def _targets(ids: Tensor, mask: Tensor) -> Tensor:
    """(B, S) next-token targets: ids[:, 1:] where both positions are unmasked, else IGNORE_INDEX."""
    keep = mask[:, :-1].bool() & mask[:, 1:].bool()  # (B, S-1)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(keep, ids[:, 1:], IGNORE_INDEX)
    return targets


def _batch_sums(model, teacher, batch: Batch, chunk_tokens: int) -> dict[str, float]:
    """One batch's sums: CE (nats) and targets; KL, top-1 matches and positions with a teacher."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = _targets(ids, mask)
    rows = mask.bool() if teacher is not None else targets != IGNORE_INDEX  # (B, S) positions to evaluate
    dev = _device(model)
    h_s = _hidden(model, ids, mask)[rows.to(dev)]  # (N, H_s)
    h_t = _hidden(teacher, ids, mask)[rows.to(_device(teacher))] if teacher is not None else None  # (N, H_t)
    tgt = targets[rows].to(dev)  # (N,)
    head_s = _head(model)
    head_t = _head(teacher) if teacher is not None else None
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # ce, kl, top1
    for start in range(0, tgt.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        log_q = F.log_softmax(head_s(h_s[part]).float(), dim=-1)  # (c, V) student
        sums[0] += F.nll_loss(log_q, tgt[part], ignore_index=IGNORE_INDEX, reduction="sum").double()
        if teacher is None:
            continue
        log_p = F.log_softmax(head_t(h_t[part]).float(), dim=-1).to(dev)  # (c, V) teacher
        sums[1] += F.kl_div(log_q, log_p, reduction="sum", log_target=True).double()
        sums[2] += (log_q.argmax(-1) == log_p.argmax(-1)).sum().double()
        del log_p
    ce, kl, top1 = sums.cpu().tolist()
    targets_counted = int((tgt != IGNORE_INDEX).sum())
    return {"ce": ce, "targets": targets_counted, "kl": kl, "top1": top1, "positions": tgt.shape[0]}


def _scan(model, teacher, batches: Iterable[Batch], chunk_tokens: int, progress: bool) -> dict[str, float]:
    """One pass over `batches`: loss/perplexity/tokens, plus kl/top1_agreement when a teacher is given."""
    if chunk_tokens < 1:
        raise CompactLMError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if teacher is not None and _vocab(teacher) != _vocab(model):
        raise CompactLMError(
            f"teacher vocabulary size {_vocab(teacher)} != student vocabulary size {_vocab(model)}: "
            "KL needs the same tokenizer")
    total = {"ce": 0.0, "targets": 0, "kl": 0.0, "top1": 0.0, "positions": 0}
    models = (model,) if teacher is None else (model, teacher)
    with _eval_mode(*models):
        for batch in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
            for key, value in _batch_sums(model, teacher, batch, chunk_tokens).items():
                total[key] += value
    if total["targets"] == 0:
        raise CompactLMError("evaluation batches hold no non-padding target tokens (rows need 2+)")
    loss = total["ce"] / total["targets"]
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": total["targets"]}
    if teacher is not None:
        out |= {"kl": total["kl"] / total["positions"], "top1_agreement": total["top1"] / total["positions"]}
    return out


def perplexity(model, batches: Iterable[Batch], *, progress: bool = False) -> dict:
    """{"loss": mean next-token CE (nats/token), "perplexity": exp(loss), "tokens": targets counted}."""
    return _scan(model, None, batches, 2048, progress)


def teacher_agreement(student, teacher, batches: Iterable[Batch], *, chunk_tokens: int = 2048,
                      progress: bool = False) -> dict:
    """{"kl": mean KL(teacher || student) per non-padding token (nats), "top1_agreement": match rate}."""
    out = _scan(student, teacher, batches, chunk_tokens, progress)
    return {"kl": out["kl"], "top1_agreement": out["top1_agreement"]}


def _generate(model, tokenizer, prompt: str, new_tokens: int, exact: bool) -> tuple[Tensor, int]:
    """Greedy generate with KV cache at batch 1: (1, P + n) ids and the prompt length P."""
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"].to(_device(model))
    if ids.shape[1] == 0:
        raise CompactLMError(f"prompt {prompt!r} tokenizes to no tokens")
    pad = tokenizer.pad_token_id
    if pad is None:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens if exact else None, do_sample=False, use_cache=True, pad_token_id=pad,
        temperature=None, top_p=None, top_k=None,  # greedy: ignore sampling defaults
    )
    return out, ids.shape[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_speed(model, tokenizer, *, prompt: str = "The", new_tokens: int = 64,
                     repeats: int = 2) -> dict:
    """{"tokens_per_s": greedy decode rate: batch 1, KV cache, `new_tokens` a run, after a warm-up}."""
    if new_tokens < 1 or repeats < 1:
        raise CompactLMError(f"generation_speed: need new_tokens, repeats >= 1, got {new_tokens}, {repeats}")
    device = _device(model)
    with _eval_mode(model):
        _generate(model, tokenizer, prompt, new_tokens, exact=True)  # warm-up: kernels, allocator, caches
        produced, elapsed = 0, 0.0
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            out, prompt_len = _generate(model, tokenizer, prompt, new_tokens, exact=True)
            _sync(device)
            elapsed += time.perf_counter() - start
            produced += out.shape[1] - prompt_len
    return {"tokens_per_s": produced / max(elapsed, 1e-9)}


def sample_text(model, tokenizer, prompt: str, *, new_tokens: int = 40) -> str:
    """The greedy continuation of `prompt` (prompt excluded): <= `new_tokens` tokens, no specials."""
    with _eval_mode(model):
        out, prompt_len = _generate(model, tokenizer, prompt, new_tokens, exact=False)
    return tokenizer.decode(out[0, prompt_len:].tolist(), skip_special_tokens=True)


def evaluate(model, batches: Iterable[Batch], *, teacher=None, tokenizer=None, speed: bool = True,
             progress: bool = False) -> dict:
    """params, loss, perplexity, tokens; + kl, top1_agreement (teacher); + tokens_per_s (speed, tokenizer)."""
    out = {"params": num_params(model)} | _scan(model, teacher, batches, 2048, progress)  # one pass
    if speed and tokenizer is not None:
        out |= generation_speed(model, tokenizer)
    log.info("evaluation: %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()})
    return out
