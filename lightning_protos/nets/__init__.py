"""Plain nn.Modules, no Lightning."""

from .averaging import ParameterAverage
from .cm import ClusteringModule
from .mlp import MLPAutoencoder, mlp

__all__ = ["ClusteringModule", "MLPAutoencoder", "ParameterAverage", "mlp"]
