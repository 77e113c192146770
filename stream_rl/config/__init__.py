"""Typed configuration: one msgspec Struct per section (`sections`),
validated at load (`load`: YAML and overrides; `checks`: what crosses
sections). A config file is YAML; `--set section.key=value` overrides are
applied on top before validation, so an override is checked exactly like
the file. Errors name the offending field by its dotted path and, for
enumerations, the allowed values.
"""

from stream_rl.config.checks import generator_addrs, split_address
from stream_rl.config.load import EVAL_INHERITS, config_from_dict, config_to_dict, load_config
from stream_rl.config.sections import (BufferConfig, Config, ConfigError, DataConfig, EvalConfig, GeneratorConfig,
                                       LearnerConfig, ModelConfig, NonNegFloat, NonNegInt, PosFloat, PosInt,
                                       PrunerConfig, Prob, RayConfig, RunConfig, WeightsSyncConfig)
from stream_rl.config.sparsity import SparsityConfig

__all__ = ["BufferConfig", "Config", "ConfigError", "DataConfig", "EVAL_INHERITS", "EvalConfig", "GeneratorConfig",
           "LearnerConfig", "ModelConfig", "NonNegFloat", "NonNegInt", "PosFloat", "PosInt", "PrunerConfig", "Prob",
           "RayConfig", "RunConfig", "SparsityConfig", "WeightsSyncConfig", "config_from_dict", "config_to_dict",
           "generator_addrs", "load_config", "split_address"]
