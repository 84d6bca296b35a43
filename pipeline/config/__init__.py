"""The configuration: one typed tree for every stage (`schema`), loaded once at the edge (`loading`: YAML file +
`--set` overrides). Invalid input becomes a `ConfigError` whose message lists, per problem, the field path, the bad
value and what is allowed.
"""

from pipeline.config.loading import bind_config, config_diff, load_config, read_yaml, validate, with_updates
from pipeline.config.schema import (
    BindingError,
    Config,
    ConfigError,
    DataConfig,
    Domain,
    ScalingSettings,
    TeacherConfig,
)

__all__ = [
    "BindingError",
    "Config",
    "ConfigError",
    "DataConfig",
    "Domain",
    "ScalingSettings",
    "TeacherConfig",
    "bind_config",
    "config_diff",
    "load_config",
    "read_yaml",
    "validate",
    "with_updates",
]
