"""camkd: Confidence-Aware Multi-Teacher Knowledge Distillation (CA-MKD) in pure PyTorch.

The method as a library: model zoo with feature outputs, connectors, losses, strategies, metrics. Usable from a
notebook with plain tensors. Never imports Ray (a test enforces it).
"""

from camkd import losses
from camkd.connectors import Connector
from camkd.groups import TeacherGroups
from camkd.strategies import (
    STRATEGIES,
    Distiller,
    Strategy,
    StrategyOutput,
    StrategyParams,
    TeacherOutputs,
    create_strategy,
    strategy_class,
)

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "Connector",
    "Distiller",
    "Strategy",
    "StrategyOutput",
    "StrategyParams",
    "TeacherGroups",
    "TeacherOutputs",
    "create_strategy",
    "losses",
    "strategy_class",
]
