"""Pure tensor functions, each tested alone against a reference."""

from .cm import aecm_terms, cm_terms, dirichlet_term
from .latent import around, interpolate
from .kmeans import kmeans_centres, kmeans_pp_centres, pinv_encoder

__all__ = [
    "aecm_terms",
    "around",
    "interpolate",
    "cm_terms",
    "dirichlet_term",
    "kmeans_centres",
    "kmeans_pp_centres",
    "pinv_encoder",
]
