"""The config: the schema (`schema.py`), reading and writing it (`loading.py`), and what a run may do with it
(`policy.py`: cascades and resume). Import from here: `from compactlm.config import Config, load_config`."""

from compactlm.config.loading import from_dict, load_config, parse_overrides, read_yaml, save_config, to_dict
from compactlm.config.policy import (
    CASCADE_KEYS, MAY_CHANGE_ON_RESUME, cascade_length, cascade_step, check_one_size, check_resume,
)
from compactlm.config.schema import (
    DEVICE, INT_LIMIT, SEED_LIMIT, CalibConfig, Config, CorrectionConfig, DatasetConfig, DistillConfig, EvalConfig,
    ExportConfig, ImportanceConfig, InvalidValue, PruneConfig, SearchConfig, Size, TargetConfig, TrainConfig, choice,
    path_key,
)

__all__ = [
    "choice",
    "path_key",
    "INT_LIMIT",
    "SEED_LIMIT",
    "DEVICE",
    "InvalidValue",
    "Size",
    "DatasetConfig",
    "CalibConfig",
    "ImportanceConfig",
    "PruneConfig",
    "TargetConfig",
    "EvalConfig",
    "TrainConfig",
    "DistillConfig",
    "SearchConfig",
    "CorrectionConfig",
    "ExportConfig",
    "Config",
    "from_dict",
    "to_dict",
    "parse_overrides",
    "read_yaml",
    "load_config",
    "save_config",
    "CASCADE_KEYS",
    "cascade_length",
    "cascade_step",
    "check_one_size",
    "MAY_CHANGE_ON_RESUME",
    "check_resume",
]
