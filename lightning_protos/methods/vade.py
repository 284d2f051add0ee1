"""VaDE: Variational Deep Embedding (Jiang, Zheng, Tan, Tang, Zhou, IJCAI 2017; METHODS 2),
on the VAE family's conv network (methods/vae.py; VAESim Table 1 baseline) or on the paper's
fully connected one (``network: mlp``, ``reconstruction: bce``: configs/vade_mnist_paper.yaml).

Generative model: c ~ Cat(pi), z | c ~ N(mu_c, diag sigma_c^2), x | z from the decoder. pi
(softmax of logits), mu_c and log sigma_c^2 are parameters, trained by the optimiser with the
network. Inference: q(z|x) = N(z_mu, diag exp(z_logvar)) from the encoder; q(c|x) = gamma =
p(c|z) in closed form (§3.2).

1. epochs [0, pretrain_epochs): the network as a plain autoencoder, x~ = d(z_mu),
   minimise L_recon (the VAE family's reconstruction: MSE, or BCE with ``bce``)   (§3.3)
2. at epoch pretrain_epochs, once: fit scikit-learn's GaussianMixture (diagonal covariances)
   on z_mu of the whole training split; pi, mu_c, sigma_c^2 <- its weights (``mixture_weights:
   learned``; ``uniform`` keeps pi = 1/K), means, variances;
   the encoder's log-variance head (which the autoencoder never trained) is set to output
   log sum_c w_c sigma_c^2 with the GMM's weights w, the mean spread of a component (ours, see below)
3. each batch after that (ops.vade_kl_terms):                                     (§3.2)
     z = z_mu + exp(z_logvar / 2) * eps,  x~ = d(z),  gamma = p(c | z)
     minimise -ELBO = L_recon + beta / q * (KL_z + KL_c), batch means, with
       KL_z = sum_c gamma_c KL(q(z|x) || N(mu_c, sigma_c^2))     (summed over the q dims)
       KL_c = KL(gamma || pi)
Prediction: gamma at z = z_mu; its argmax is the cluster. Prototypes: mu_c. Samples of cluster
c: d(mu_c + sigma_c * eps).

The ELBO is scaled as the family's (``VAEMethod.elbo_terms``): L_recon is a mean over
the d pixels, and the KL terms, in nats per latent dimension, are weighted by beta; with beta =
5e-3 the VAESim network's ELBO. The paper's -ELBO sums the Bernoulli terms over the d pixels and
the KL terms over z, so with ``bce`` and beta = q / d our loss is exactly the paper's divided by
d (MNIST, q = 10: beta = 10/784). The component variances are floored smoothly at 1e-6
(ops.floored_logvar: sigma_c^2 = exp(raw) + 1e-6), so no gradient step can make one
non-positive or underflow to zero. Deviations from the VaDE paper (METHODS 3.5 asks for its
standard settings with latent 32, the VAESim authors having run an absent code's "default
parameters"; the network is our choice, so that the table's methods share one): by default the
conv network and its MSE reconstruction instead of d-500-500-2000-10 with a Bernoulli decoder
(``network: mlp``, ``reconstruction: bce`` and beta = q / d restore those, as
``configs/vade_mnist_paper.yaml`` does; PneumoniaMNIST has no such config);
the autoencoder is pretrained inside the run, by epoch, on its own Adam (so the
pretraining does not move the moments of the VaDE phase; the learning-rate schedule counts
the VaDE epochs only); the log-variance head set at the GMM fit (left at its random
initialisation, it draws z with variance ~1 around codes whose components are far tighter, and
the first VaDE steps merged the clusters of well-separated test blobs on 3 seeds of 4: ARI 1.0
after the GMM, 0.55 after training; 1.0 on all 4 with the head set).

``mixture_weights: uniform``: the VaDE authors' code (slim1017/VaDE, VaDE.py) starts its weights
theta at 1/K, never sets them from the GMM (only the means and variances), and lets Adam move
them unnormalised; gamma's normalisation cancels a common growth, so their prior stays close to
uniform. A fixed uniform pi is the nearest choice with a normalised prior.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from ..errors import check_choices, check_non_negative, check_positive
from ..ops import floored_logvar, mixture_responsibilities, raw_logvar, vade_kl_terms
from .base import ClusteringMethod, adam
from .distributed import broadcast_from_rank0, on_rank0
from .vae import VADE_HIDDEN, Network, Reconstruction, VAEMethod


def diagonal_gmm(z: Tensor, k: int, seed: int, n_init: int) -> tuple[Tensor, Tensor, Tensor]:
    """scikit-learn's GaussianMixture (diagonal covariances, ``n_init`` restarts) on ``z``
    ``(N, q)``: its weights ``(K,)``, means and variances ``(K, q)``, float64 on the CPU."""
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(k, covariance_type="diag", n_init=n_init, random_state=seed).fit(z.cpu().double().numpy())
    rank_zero_info(f"VaDE: GMM fitted on {len(z)} codes (converged: {gmm.converged_})")
    return tuple(torch.as_tensor(a) for a in (gmm.weights_, gmm.means_, gmm.covariances_))


class VaDE(VAEMethod):
    """VaDE on the VAESim network (or, with ``network: mlp``, on the paper's).

    Args:
        n_clusters: K, the mixture components (MNIST 10, PneumoniaMNIST 2: the classes).
        input_shape: ``(C, 28, 28)`` or ``(C, 32, 32)`` (any with ``network: mlp``; linked from
            the data by the CLI).
        latent_dim: q (ours: 32, METHODS 3; the paper: 10).
        beta: weight of the KL terms per latent dimension (ours: the family's 5e-3; the paper's
            ELBO: q / d with ``bce``).
        encoder: ``bn_relu`` or ``linear`` (see :class:`VAEMethod`).
        channels: encoder widths (ours: 64-128-256); the decoder mirrors them.
        lr: Adam learning rate of both phases (the VaDE code: 2e-3).
        lr_step_epochs: multiply the learning rate by ``lr_step_gamma`` every this many epochs
            (the VaDE code: 10 and 0.9); ``None`` keeps it constant.
        lr_step_gamma: the factor of that decay.
        pretrain_epochs: autoencoder pretraining epochs before the GMM is fitted (0: the GMM
            is fitted on the codes of the untrained network).
        gmm_n_init: restarts of the GaussianMixture (scikit-learn's default: 1).
        mixture_weights: ``learned`` (the paper: pi from the GMM, then trained) or ``uniform``
            (pi = 1/K throughout, not trained; close to what the VaDE code does, see below).
        network: ``conv`` (ours) or ``mlp`` (the paper's d-500-500-2000-q, see :class:`VAEMethod`).
        hidden: the ``mlp`` encoder's hidden widths (the paper: 500-500-2000).
        reconstruction: ``mse`` (ours) or ``bce`` (the paper's Bernoulli decoder).
    """

    ddp_unused_parameters = True  # the mixture parameters wait out the pretraining

    def __init__(
        self,
        n_clusters: int = 10,
        input_shape: tuple[int, ...] = (1, 28, 28),
        latent_dim: int = 32,
        beta: float = 5e-3,
        encoder: Literal["bn_relu", "linear"] = "bn_relu",
        channels: Sequence[int] = (64, 128, 256),
        lr: float = 2e-3,
        lr_step_epochs: int | None = 10,
        lr_step_gamma: float = 0.9,
        pretrain_epochs: int = 10,
        gmm_n_init: int = 1,
        mixture_weights: Literal["learned", "uniform"] = "learned",
        network: Network = "conv",
        hidden: Sequence[int] = VADE_HIDDEN,
        reconstruction: Reconstruction = "mse",
    ) -> None:
        super().__init__(
            n_clusters=n_clusters, input_shape=input_shape, latent_dim=latent_dim, condition_dim=0, beta=beta,
            prior_std=1.0, encoder=encoder, channels=channels, lr=lr, lr_step_epochs=lr_step_epochs,
            lr_step_gamma=lr_step_gamma, network=network, hidden=hidden, reconstruction=reconstruction,
        )  # fmt: skip
        check_positive(gmm_n_init=gmm_n_init)
        check_choices(mixture_weights=(mixture_weights, ("learned", "uniform")))
        check_non_negative(pretrain_epochs=pretrain_epochs)
        self.save_hyperparameters()
        # The mixture prior, set by the GMM at the end of pretraining: pi = softmax(pi_logits),
        # sigma_c^2 = exp(logvar_raw) + 1e-6 (positive whatever the optimiser does).
        self.pi_logits = nn.Parameter(torch.zeros(n_clusters), requires_grad=mixture_weights == "learned")
        self.mu_c = nn.Parameter(torch.zeros(n_clusters, latent_dim))
        self.logvar_raw = nn.Parameter(torch.zeros(n_clusters, latent_dim))
        self.register_buffer("initialised", torch.tensor(False))  # the GMM has been fitted

    # -- the mixture prior --------------------------------------------------------------
    @property
    def log_pi(self) -> Tensor:
        """``(K,)`` log mixture weights."""
        return torch.log_softmax(self.pi_logits, dim=0)

    @property
    def logvar_c(self) -> Tensor:
        """``(K, q)`` log sigma_c^2, sigma_c^2 > 1e-6."""
        return floored_logvar(self.logvar_raw)

    def responsibilities(self, z: Tensor) -> Tensor:
        """gamma = p(c | z) of latents ``(B, q)``, ``(B, K)``, in float32."""
        with self.full_precision():
            return mixture_responsibilities(z.float(), self.log_pi, self.mu_c, self.logvar_c)

    # -- contract -----------------------------------------------------------------------
    def cluster_probs(self, x: Tensor) -> Tensor:
        """gamma at z = z_mu, ``(B, K)``."""
        return self.responsibilities(self.embed(x))

    def prototypes(self) -> Tensor:
        """The component means mu_c, ``(K, q)``."""
        return self.mu_c.detach().clone()

    # -- phases -------------------------------------------------------------------------
    def clustering_start(self) -> int:
        return self.hparams.pretrain_epochs

    @torch.no_grad()
    def init_mixture(self) -> None:
        """Step 2: GaussianMixture (diagonal) on z_mu of the whole training split; rank 0's fit
        on every rank."""
        self.fit_mixture(self.embed_all(self.fit_features()))

    @torch.no_grad()
    def fit_mixture(self, z: Tensor) -> None:
        """The prior p(c), p(z|c) from a GaussianMixture (diagonal) fitted on the codes ``z``
        ``(N, q)``, and q(z|x)'s variance head set to the components' spread; fitted by rank 0
        alone under DDP."""
        seed = self.sklearn_seed
        fitted = on_rank0(diagonal_gmm, z, self.n_clusters, seed, self.hparams.gmm_n_init)
        weights, means, variances = (a.to(self.mu_c) for a in fitted)
        if self.hparams.mixture_weights == "learned":
            self.pi_logits.copy_(torch.log(weights))
        self.mu_c.copy_(means)
        self.logvar_raw.copy_(raw_logvar(variances))
        head = self.encoder.logvar  # q(z|x) starts at the components' spread, not at N(0, I)'s
        head.weight.zero_()
        head.bias.copy_(torch.log(weights @ variances))
        broadcast_from_rank0((self.pi_logits, self.mu_c, self.logvar_raw, head.bias))  # what each rank derived
        self.initialised.fill_(True)

    def on_train_epoch_start(self) -> None:
        if not self.before_clustering() and not bool(self.initialised):
            self.init_mixture()

    # -- optimisation -------------------------------------------------------------------
    def configure_optimizers(self):
        """The family's Adam on every parameter (with its schedule) for the VaDE phase, and a
        second Adam on the network alone for the pretraining."""
        network = [*self.encoder.parameters(), *self.decoder.parameters()]
        pretrain = adam(network, self.hparams.lr)
        configured = super().configure_optimizers()
        if isinstance(configured, torch.optim.Optimizer):
            return [configured, pretrain]
        (optimizer,), schedulers = configured
        return [optimizer, pretrain], schedulers

    def on_train_epoch_end(self) -> None:
        if self.before_clustering():  # the learning-rate schedule counts the VaDE epochs only
            ClusteringMethod.on_train_epoch_end(self)
        else:
            super().on_train_epoch_end()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        optimizer, pretrain_optimizer = self.optimizers()
        x = self.to_net(batch["x"])
        mu, logvar = self.encoder(x)
        if self.before_clustering():  # step 1
            loss = self.check_and_log({"L_recon": self.reconstruction_loss(x, self.reconstruct(mu))}, prefix="pretrain")
            self.optimize(loss, pretrain_optimizer)
            return
        z = self.reparameterise(mu, logvar)  # step 3
        out = self.reconstruct(z)
        with self.full_precision():
            kl_z, kl_c, _ = vade_kl_terms(mu.float(), logvar.float(), z.float(), self.log_pi, self.mu_c, self.logvar_c)
            weight = self.hparams.beta / self.hparams.latent_dim
            terms = {
                "L_recon": self.reconstruction_loss(x, out),
                "KL_z": weight * kl_z.mean(),
                "KL_c": weight * kl_c.mean(),
            }
        self.optimize(self.check_and_log(terms), optimizer)
