"""Pure tensor functions, each tested alone against a reference."""

from .augment import affine, random_affine, random_equalize
from .cm import aecm_terms, cm_terms, dirichlet_term, orthonormality_penalty, sparsity_terms
from .dec import kl_clustering_loss, student_t_assign, student_t_logits, target_distribution
from .dkm import annealed_alpha, dkm_clustering_loss, dkm_weights
from .elbow import elbow_kmeans, kneedle_elbow
from .kmeans import (
    cluster_sums,
    kmeans_centres,
    kmeans_pp_centres,
    nearest_one_hot,
    pinv_encoder,
    running_mean_update,
    squared_distances,
)
from .latent import around, interpolate, nearest
from .mixture import (
    categorical_kl,
    component_log_densities,
    diag_gaussian_kl,
    expected_gaussian_kl,
    floored_logvar,
    gaussian_kl,
    mixture_log_responsibilities,
    mixture_responsibilities,
    raw_logvar,
    vade_kl_terms,
)
from .mmd import gaussian_kernel, grouped_mmd, mmd
from .sinkhorn import sinkhorn
from .vaesim import (
    draw_assignments,
    ema_prototype_update,
    ortho_loss,
    similarity,
    soft_assign,
    temperature,
)

__all__ = [
    "aecm_terms",
    "affine",
    "annealed_alpha",
    "around",
    "categorical_kl",
    "cluster_sums",
    "cm_terms",
    "component_log_densities",
    "diag_gaussian_kl",
    "dirichlet_term",
    "dkm_clustering_loss",
    "dkm_weights",
    "draw_assignments",
    "elbow_kmeans",
    "ema_prototype_update",
    "expected_gaussian_kl",
    "floored_logvar",
    "gaussian_kernel",
    "gaussian_kl",
    "grouped_mmd",
    "interpolate",
    "kl_clustering_loss",
    "kmeans_centres",
    "kmeans_pp_centres",
    "kneedle_elbow",
    "mixture_log_responsibilities",
    "mixture_responsibilities",
    "mmd",
    "nearest",
    "nearest_one_hot",
    "ortho_loss",
    "orthonormality_penalty",
    "pinv_encoder",
    "random_affine",
    "random_equalize",
    "raw_logvar",
    "running_mean_update",
    "similarity",
    "sinkhorn",
    "soft_assign",
    "sparsity_terms",
    "squared_distances",
    "student_t_assign",
    "student_t_logits",
    "target_distribution",
    "temperature",
    "vade_kl_terms",
]
