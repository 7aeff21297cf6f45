"""`compactlm distill` and `compactlm train`: check the inputs, load models and data, run the loop.

Outputs in `out_dir`: checkpoint/ (latest resumable training state), best/ (lowest validation loss) and
final/ (plain Hugging Face checkpoints with the tokenizer), metrics.jsonl, tensorboard/ (when installed) and
the resolved config. An out_dir that already holds a checkpoint is refused unless `resume=true`.
The student trains in float32 (AdamW master weights; bf16 autocast on CUDA); `dtype` applies to the teacher.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from compactlm import stages
from compactlm.chartok import prepare_tokenizer
from compactlm.config import Config, TrainConfig, save_config
from compactlm.distill import checkpoint as ckpt
from compactlm.distill.distributed import Dist, setup, teardown
from compactlm.distill.loop import Session, fit, total_steps
from compactlm.errors import CompactLMError
from compactlm.models.family import family_of, get_module
from compactlm.models.loading import load_model, load_model_config, load_tokenizer, num_params
from compactlm.pruning.plan import read_hidden_keep

log = logging.getLogger(__name__)


def run_distill(cfg: Config) -> dict:
    """`compactlm distill`: retrain cfg.student from cfg.teacher by knowledge distillation; final metrics."""
    missing = [key for key in ("teacher", "student") if not getattr(cfg, key)]
    if missing:
        raise CompactLMError(f"distill needs {' and '.join(f'{k}=MODEL' for k in missing)}")
    return _run(cfg, cfg.distill, "distill", cfg.student, cfg.teacher)


def run_train(cfg: Config) -> dict:
    """`compactlm train`: plain cross-entropy training of cfg.model (init=random: fresh weights)."""
    return _run(cfg, cfg.train, "train", cfg.model, None)


def check_train_config(tc: TrainConfig, section: str, world: int) -> None:
    """One-line errors for batch sizes, budget and learning rates that cannot run on `world` processes."""
    micro = tc.micro_batch_size or tc.batch_size // max(world, 1)
    if tc.batch_size < 1 or micro < 1 or tc.batch_size % (world * micro):
        raise CompactLMError(
            f"{section}.batch_size={tc.batch_size} must be a positive multiple of "
            f"world size x micro_batch_size = {world} x {micro}")
    if total_steps(tc) < 1:
        per_batch = tc.batch_size * tc.seq_len
        raise CompactLMError(f"{section}.tokens={tc.tokens} is less than one global batch "
                             f"({section}.batch_size x {section}.seq_len = {per_batch} tokens)")
    if not 0 <= tc.min_lr <= tc.lr or tc.lr <= 0:
        raise CompactLMError(f"{section}: need 0 <= min_lr <= lr and lr > 0, "
                             f"got lr={tc.lr}, min_lr={tc.min_lr}")
    for key in ("chunk_tokens", "eval_sequences"):
        if getattr(tc, key) < 1:
            raise CompactLMError(f"{section}.{key} must be >= 1, got {getattr(tc, key)}")


def _check_out_dir(cfg: Config) -> None:
    found = ckpt.latest(cfg.out_dir)
    if found is not None and not cfg.resume:
        step = ckpt.read_progress(found).step
        raise CompactLMError(f"out_dir {cfg.out_dir} already holds a training checkpoint (step {step}): "
                             "pass resume=true to continue it, or choose another out_dir")


def _vocab(model) -> int:
    return int(get_module(model, family_of(model).lm_head_path).weight.shape[0])


def _fit_to_tokenizer(config, tokenizer):
    """A model config for fresh weights: vocab_size = len(tokenizer), bos/eos/pad ids from the tokenizer."""
    eos = tokenizer.eos_token_id
    ids = {"vocab_size": len(tokenizer), "eos_token_id": eos,
           "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos}
    for key, value in ids.items():
        if value is not None and getattr(config, key, None) != value:
            log.info("init=random: %s %s -> %s (from the tokenizer)", key, getattr(config, key, None), value)
            setattr(config, key, value)
    return config


def _load_models(cfg: Config, tc: TrainConfig, section: str, student_spec: str, teacher_spec: str | None,
                 device: torch.device):
    """(student in float32, tokenizer, teacher or None), with vocabulary and sequence length checked."""
    tokenizer = load_tokenizer(cfg.tokenizer or student_spec)
    if cfg.init == "random":  # the architecture only: a config-only directory is enough
        from transformers import AutoModelForCausalLM

        config = _fit_to_tokenizer(load_model_config(student_spec), tokenizer)
        torch.manual_seed(cfg.seed)  # every rank builds the same weights
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
        log.info("init=random: %s architecture with fresh weights (seed %d), vocabulary %d",
                 student_spec, cfg.seed, config.vocab_size)
    else:
        student = load_model(student_spec, dtype="float32", device=device)
        if len(tokenizer) > _vocab(student):
            raise CompactLMError(f"tokenizer {cfg.tokenizer or student_spec} has {len(tokenizer)} tokens, more than "
                                 f"the vocabulary ({_vocab(student)}) of {student_spec}")
    stages.check_seq_len(student, tc.seq_len, f"{section}.seq_len")
    teacher = None
    if teacher_spec is not None:
        teacher = load_model(teacher_spec, dtype=cfg.dtype, device=device)
        stages.check_seq_len(teacher, tc.seq_len, f"{section}.seq_len")
        if _vocab(teacher) != _vocab(student):
            raise CompactLMError(f"teacher vocabulary size {_vocab(teacher)} != student vocabulary size "
                                 f"{_vocab(student)}: distillation needs the same tokenizer")
    return student, tokenizer, teacher


def _run(cfg: Config, tc: TrainConfig, section: str, student_spec: str, teacher_spec: str | None) -> dict:
    _check_out_dir(cfg)
    cfg = prepare_tokenizer(cfg, cfg.out_dir)  # tokenizer=char: built from cfg.data into out_dir/tokenizer
    d: Dist = setup(cfg.device)
    try:
        check_train_config(tc, section, d.world)
        student, tokenizer, teacher = _load_models(cfg, tc, section, student_spec, teacher_spec, d.device)
        splits = stages.load_splits(cfg, tokenizer, tc.seq_len, calib=False)
        val = splits.val[: tc.eval_sequences]
        out = Path(cfg.out_dir)
        if d.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / stages.CONFIG_FILE)
        log.info("%s: %d train, %d validation rows of %d tokens; %d steps of %d sequences on %d process(es)",
                 section, len(splits.train), len(val), tc.seq_len, total_steps(tc), tc.batch_size, d.world)
        params = num_params(student)
        session = Session(out, d, tokenizer, cfg.seed, cfg.resume, progress=True)
        keep = read_hidden_keep(student_spec) if teacher is not None else None  # hidden map starts as the plan
        result = fit(student, splits.train, val, tc, session, teacher=teacher, hidden_keep=keep)
    finally:
        teardown(d)
    return {"out_dir": str(out), "params": params, **result}
