"""Knowledge distillation and plain training (library code): losses (pure), the loop, checkpoints, distributed
setup. The `distill`/`train` commands that load models and data for it are stages.distill and stages.train."""

from compactlm.distill.loop import Session, fit, lr_at, total_steps
from compactlm.distill.losses import (
    cosine_loss,
    default_layer_map,
    dynamic_alpha,
    kd_loss,
    kd_loss_reference,
    teacher_topk,
    topk_kd_loss,
    topk_kd_loss_reference,
)
from compactlm.distill.trainee import Objective, Teacher, Trainee

__all__ = [
    "kd_loss", "kd_loss_reference", "topk_kd_loss", "topk_kd_loss_reference", "teacher_topk",
    "cosine_loss", "dynamic_alpha", "default_layer_map",
    "Objective", "Session", "Teacher", "Trainee", "fit", "lr_at", "total_steps",
]
