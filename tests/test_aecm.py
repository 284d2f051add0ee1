"""AE-CM: Eq. 10 by hand, orthonormal centroids, recovery of blobs, exact checkpoint restore."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import check_contract, spy_step

import lightning_protos.methods.aecm as aecm_module
import lightning_protos.methods.cm as cm_module
from lightning_protos.data import Blobs
from lightning_protos.eval.callbacks import ClusteringEvaluator
from lightning_protos.eval.metrics import clustering_scores
from lightning_protos.methods.aecm import AECM
from lightning_protos.methods.cm import CM


def _trainer(tmp_path, epochs: int, **kw) -> L.Trainer:
    kw = {"limit_val_batches": 0, **kw}
    return L.Trainer(
        max_epochs=epochs,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def _blobs(batch_size: int = 50) -> Blobs:
    return Blobs(n_samples=600, n_features=10, centers=4, cluster_std=1.0, batch_size=batch_size)


def _small(init: str = "random", **kw) -> AECM:
    args = dict(latent_dim=4, hidden=(32, 32), alpha=5.0, beta=1.0, init=init, pretrain_epochs=5, cm_epochs=5)
    return AECM(4, (10,), **{**args, **kw})


def by_hand(x, x_rec, z, gamma, mu, alpha) -> dict[str, float]:
    """Eq. 7's and Eq. 10's terms written out with explicit loops in float64."""
    x, x_rec, z, g, m = (t.detach().double().numpy() for t in (x, x_rec, z, gamma, mu))
    n, k = g.shape
    return {
        "rec": sum(((x[i] - x_rec[i]) ** 2).sum() for i in range(n)),
        "E1": sum(((z[i] - sum(g[i, c] * m[c] for c in range(k))) ** 2).sum() for i in range(n)),
        "E2": sum(g[i, c] * (1 - g[i, c]) for i in range(n) for c in range(k)),  # ||mu_k||^2 = 1 (Eq. 8)
        "E2_norms": sum(g[i, c] * (1 - g[i, c]) * (m[c] @ m[c]) for i in range(n) for c in range(k)),
        "E3": -sum(g[i, c] * g[i, j] * (m[c] @ m[j]) for i in range(n) for c in range(k) for j in range(k) if c != j),
        "E4": sum((1 - alpha) * np.log(g[:, c].mean() + 1e-10) for c in range(k)),
        "orth": sum(abs(m[c] @ m[j] - (c == j)) for c in range(k) for j in range(k)),
    }


def test_the_joint_step_sums_eq10_with_its_weights():
    torch.manual_seed(0)
    model = _small(beta=2.0, lam=0.3, average_last_epoch=False)  # beta != lam: a swap shows
    x = torch.rand(6, 10)
    terms, (optimizer,) = spy_step(model, x, optimizers=["dae", "cm", "joint"])
    with torch.no_grad():
        z, x_rec = model.autoencode(x)
        want = by_hand(x, x_rec, z, model.cm(z), model.cm.centroids(), alpha=5.0)
    assert optimizer == "joint"
    eq10 = {"L_rec": 2.0 * want["rec"], "E1": want["E1"], "E2": want["E2"], "E4": want["E4"]}
    assert terms == pytest.approx({**eq10, "L_orth": 0.3 * want["orth"]}, rel=1e-5)


def test_the_cm_alone_step_sums_eq7_on_the_codes():
    torch.manual_seed(0)
    model = _small("pretrained", pretrain_epochs=0, cm_epochs=1, beta=2.0, lam=0.3, average_last_epoch=False)
    x = torch.rand(6, 10)
    terms, (optimizer,) = spy_step(model, x, optimizers=["dae", "cm", "joint"])
    with torch.no_grad():
        z = model.encode(x)
        want = by_hand(x, x, z, model.cm(z), model.cm.centroids(), alpha=5.0)
    assert optimizer == "cm"
    assert terms == pytest.approx(
        {"E1": want["E1"], "E2": want["E2_norms"], "E3": want["E3"], "E4": want["E4"]}, rel=1e-5
    )


@pytest.mark.parametrize("lsp", ["cm", "orthonormal"])
def test_l_sp_is_the_chosen_sparsity_criterion_by_hand(tmp_path, lsp):
    """``lsp: cm``: E2 + E3 of Eq. 7 (with the centroids' norms) on the codes; ``orthonormal``:
    the orthonormal E2 plus L_orth. The evaluator sums the data terms over its batches (here
    four of 150) and adds L_orth, a property of the model alone, once."""
    torch.manual_seed(0)
    model, dm = _small(lsp=lsp, lam=0.3, average_last_epoch=False), _blobs()
    dm.eval_batch_size = 150
    trainer = _trainer(tmp_path, 1, callbacks=[ClusteringEvaluator()], limit_val_batches=1.0)
    encoded = []  # the evaluator encodes each batch once, for the assignments and L_sp both
    model.ae.encoder.register_forward_hook(lambda module, args, out: encoded.append(len(out)))
    got = trainer.validate(model, dm, verbose=False)[0]["val/l_sp"]
    assert encoded == [150] * 4
    x = dm.features("eval")
    with torch.no_grad():
        z = model.encode(x)
        want = by_hand(x, x, z, model.cm(z), model.cm.centroids(), alpha=5.0)
    if lsp == "cm":
        assert abs(want["E3"]) > 0.1 * abs(want["E2_norms"])
        assert got == pytest.approx(want["E2_norms"] + want["E3"], rel=1e-5)
    else:
        assert 0.3 * want["orth"] > 1e-3 * want["E2"]  # counted per batch, it would show
        assert got == pytest.approx(want["E2"] + 0.3 * want["orth"], rel=1e-5)


def test_centroids_stay_orthonormal(tmp_path):
    L.seed_everything(0)
    model = _small(lam=1.0)
    with torch.no_grad():  # start from orthonormal centroids: rows of an orthogonal matrix
        q, _ = torch.linalg.qr(torch.randn(4, 4))
        model.cm.decoder.weight.copy_(q)
        model.cm.decoder.bias.zero_()
    _trainer(tmp_path, 10, enable_checkpointing=False).fit(model, _blobs(batch_size=20))
    mu = model.prototypes()
    assert not torch.allclose(mu, q.T)  # the centroids moved ...
    assert (mu @ mu.T - torch.eye(4)).abs().max() < 0.1  # ... and stayed orthonormal


@pytest.mark.parametrize("cm_init", ["pinv", "posterior"])
def test_pretrained_recovers_blobs(tmp_path, cm_init):
    L.seed_everything(0)
    dm = _blobs()
    model = _small("pretrained", cm_init=cm_init)
    _trainer(tmp_path, 20, enable_checkpointing=False).fit(model, dm)
    with torch.no_grad():
        pred = model.predict_clusters(dm.features("eval"))
    assert clustering_scores(dm.labels(), pred)["ari"] > 0.9
    assert [model.phase(e) for e in (0, 5, 10)] == ["pretrain", "cm", "joint"]


@pytest.mark.parametrize("bias_init", ["zeros", "glorot_normal"])
def test_bias_init_reaches_every_layer(bias_init):
    torch.manual_seed(0)
    model = _small(bias_init=bias_init)
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(biases) == 3 + 3 + 2  # encoder, decoder, CM
    assert all(bool(b.any()) == (bias_init == "glorot_normal") for b in biases)


def test_bias_init_is_part_of_the_pretraining_cache_key(tmp_path):
    dm = _blobs()
    for bias_init, hits in (("zeros", 0), ("glorot_normal", 0), ("glorot_normal", 1)):
        L.seed_everything(0)
        model = _small("pretrained", bias_init=bias_init, pretrain_cache=str(tmp_path / "cache"))
        _trainer(tmp_path, 6, enable_checkpointing=False).fit(model, dm)
        assert (model.pretrain_cache_hit is not None) == hits
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_the_pretraining_cache_key_holds_the_world_size_under_ddp(tmp_path, monkeypatch):
    """batch_size is per process: a DDP run's pretraining is not a single process's."""
    model = _small("pretrained", pretrain_epochs=1, pretrain_cache=str(tmp_path / "cache"))
    _trainer(tmp_path, 1, enable_checkpointing=False).fit(model, _blobs())
    model._cache_key_of_fit = None
    single = model._cache_key()
    assert "world_size" not in single  # the entries written so far keep their key
    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 4))
    model._cache_key_of_fit = None
    assert model._cache_key() == {**single, "world_size": 4}


def test_unknown_cm_init_is_refused_before_training():
    with pytest.raises(ValueError, match="cm_init must be one of pinv, posterior; got 'pca'"):
        _small("pretrained", cm_init="pca")


def test_checkpoint_restores_identical_cluster_probs(tmp_path):
    L.seed_everything(0)
    dm = _blobs()
    model = _small("pretrained")
    trainer = _trainer(tmp_path, 12, enable_checkpointing=False)
    trainer.fit(model, dm)
    path = tmp_path / "aecm.ckpt"
    trainer.save_checkpoint(path)
    restored = AECM.load_from_checkpoint(path, strict=True)
    x = dm.features("eval")
    with torch.no_grad():
        assert torch.equal(model.cluster_probs(x), restored.cluster_probs(x))
    assert bool(restored.initialised)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_loss_terms_run_in_float32_outside_autocast(tmp_path, monkeypatch, precision):
    """Under bf16-mixed the networks run in bf16, but the loss sums and Gram matrices of CM and
    AE-CM (``cm_terms`` in CM and in AE-CM's CM-alone phase, ``aecm_terms`` in the joint phase,
    and in L_sp) get float32 inputs, with autocast off."""
    seen = []

    def spy(name, real):
        def terms(*tensors, **kwargs):
            seen.append((name, {t.dtype for t in tensors if torch.is_tensor(t)}, torch.is_autocast_enabled("cpu")))
            return real(*tensors, **kwargs)

        return terms

    for module, name in ((aecm_module, "cm_terms"), (aecm_module, "aecm_terms"), (cm_module, "cm_terms")):
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    dm = _blobs()
    models = [_small("pretrained", pretrain_epochs=1, cm_epochs=1), CM(4, (10,), alpha=5.0)]
    for model in models:
        L.seed_everything(0)
        _trainer(tmp_path, 3, precision=precision, enable_checkpointing=False).fit(model, dm)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            model.selection_criteria(dm.features("eval"))
    assert {name for name, _, _ in seen} == {"cm_terms", "aecm_terms"}
    assert all(dtypes == {torch.float32} and not autocast for _, dtypes, autocast in seen)


def test_the_contract():
    check_contract(_small(), torch.rand(5, 10), latent_dim=4, out_shape=(10,))


def test_max_steps_inside_the_last_epoch_averages_the_steps_taken(tmp_path):
    L.seed_everything(0)
    dm = _blobs(batch_size=200)  # 3 steps an epoch: max_steps 5 stops after 2 of the last epoch's
    model = _small()
    steps = []
    grab = L.pytorch.callbacks.LambdaCallback(
        on_train_batch_end=lambda trainer, *a: (
            trainer.current_epoch == 1 and steps.append([p.detach().clone() for p in model.parameters()])
        )
    )
    _trainer(tmp_path, 2, max_steps=5, callbacks=[grab], enable_checkpointing=False).fit(model, dm)
    assert len(steps) == 2
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(p.detach(), (steps[0][i] + steps[1][i]) / 2)
    assert not torch.equal(steps[0][0], steps[1][0])


def test_a_fit_ending_in_the_cm_alone_epochs_says_it_averaged_nothing(tmp_path):
    """AE-CM^p's last epoch inside its CM-alone phase sums no joint step: the fit warns that
    its parameters are the last step's, as a fit ending before the averaging epoch does."""
    model = _small("pretrained", pretrain_epochs=1, cm_epochs=2, pretrain_cache=False)
    with pytest.warns(
        UserWarning,
        match=r"AECM: the fit's last epoch \(the last of max_epochs=2\) had no step to average, being still in a",
    ):
        _trainer(tmp_path, 2, enable_checkpointing=False).fit(model, _blobs(batch_size=200))
