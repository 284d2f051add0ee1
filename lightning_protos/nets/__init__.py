"""Plain nn.Modules, no Lightning."""

from .averaging import ParameterAverage
from .cm import ClusteringModule
from .conv import ConvDecoder, ConvEncoder
from .mlp import MLPAutoencoder, MLPDecoder, MLPEncoder, mlp

__all__ = [
    "ClusteringModule",
    "ConvDecoder",
    "ConvEncoder",
    "MLPAutoencoder",
    "MLPDecoder",
    "MLPEncoder",
    "ParameterAverage",
    "mlp",
]
