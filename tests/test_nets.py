"""nets/: the parameter average, the clustering-module network, the MLP autoencoder and the
conv nets' memory layout."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import lightning_protos.nets.conv as conv_nets
import lightning_protos.nets.protovae as protovae_nets
from lightning_protos.nets import ClusteringModule, ConvDecoder, ConvEncoder, MLPAutoencoder, ParameterAverage
from lightning_protos.nets.protovae import ProtoDecoder, ProtoEncoder


def test_parameter_average_is_the_mean_of_the_snapshots():
    net = nn.Linear(3, 2)
    params = list(net.parameters())
    avg = ParameterAverage(params)
    rng = np.random.default_rng(0)
    snapshots = []
    for _ in range(4):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.as_tensor(rng.normal(size=tuple(p.shape)), dtype=p.dtype))
        snapshots.append([p.detach().numpy().copy() for p in params])
        avg.accumulate(params)
    assert int(avg.count) == 4
    avg.apply(params)
    for i, p in enumerate(params):
        want = np.mean([s[i] for s in snapshots], axis=0)
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-6, atol=1e-7)
    assert int(avg.count) == 0
    assert float(avg.total.abs().sum()) == 0.0


def test_parameter_average_without_snapshots_leaves_parameters_alone():
    net = nn.Linear(3, 2)
    before = [p.detach().clone() for p in net.parameters()]
    ParameterAverage(list(net.parameters())).apply(list(net.parameters()))
    for b, p in zip(before, net.parameters(), strict=True):
        assert torch.equal(b, p)


def test_steps_of_another_epoch_start_a_new_sum():
    net = nn.Linear(3, 2)
    params = list(net.parameters())
    avg = ParameterAverage(params)
    avg.start(0)
    avg.accumulate(params)
    avg.accumulate(params)
    assert avg.holds(0)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    want = [p.detach().clone() for p in params]
    avg.start(1)
    avg.accumulate(params)
    assert not avg.holds(0)
    assert avg.holds(1)
    assert int(avg.count) == 1
    avg.apply(params)
    for w, p in zip(want, params, strict=True):
        torch.testing.assert_close(p.detach(), w)


def test_parameter_average_state_is_in_the_state_dict():
    avg = ParameterAverage(list(nn.Linear(3, 2).parameters()))
    assert set(avg.state_dict()) == {"total", "count", "epoch"}
    assert avg.state_dict()["total"].shape == (3 * 2 + 2,)


def test_clustering_module_shapes_and_centroids():
    cm = ClusteringModule(6, 3)
    x = torch.randn(4, 6)
    gamma = cm(x)
    assert gamma.shape == (4, 3)
    torch.testing.assert_close(gamma.sum(1), torch.ones(4))
    # mu_k is the decoder's image of the k-th basis vector
    with torch.no_grad():
        torch.testing.assert_close(cm.centroids(), cm.decoder(torch.eye(3)))


def test_keras_glorot_normal_matches_its_variance_and_truncation():
    from lightning_protos.nets.mlp import keras_glorot_normal_

    torch.manual_seed(0)
    bias = keras_glorot_normal_(torch.empty(200_000))
    # Keras: a 1-d tensor of n values has fan_in = fan_out = n, so variance 2 / 2n = 1 / n
    np.testing.assert_allclose(bias.var().item(), 1 / 200_000, rtol=0.02)
    # truncated at two standard deviations of the (pre-truncation) normal
    bound = 2 * (1 / 200_000) ** 0.5 / 0.87962566103423978
    assert bias.abs().max().item() <= bound
    assert bias.abs().max().item() > 0.95 * bound
    kernel = keras_glorot_normal_(torch.empty(300, 500))  # (out, in) as nn.Linear stores it
    np.testing.assert_allclose(kernel.var().item(), 2 / (300 + 500), rtol=0.02)


@pytest.mark.parametrize("bias_init", ["zeros", "glorot_normal"])
def test_clustering_module_bias_init(bias_init):
    torch.manual_seed(0)
    cm = ClusteringModule(784, 10, bias_init=bias_init)
    if bias_init == "zeros":
        assert not cm.encoder.bias.any()
        assert not cm.decoder.bias.any()
    else:  # std 1 / sqrt(n): 0.32 for the K = 10 logits, 0.036 for the 784 decoder outputs
        assert 0.15 < cm.encoder.bias.std().item() < 0.5
        np.testing.assert_allclose(cm.decoder.bias.std().item(), 784**-0.5, rtol=0.1)
    with pytest.raises(ValueError, match="bias_init"):
        ClusteringModule(4, 2, bias_init="ones")


def test_mlp_autoencoder_shapes():
    ae = MLPAutoencoder(12, hidden=(8, 6), latent_dim=2)
    z, x_rec = ae(torch.randn(5, 12))
    assert z.shape == (5, 2)
    assert x_rec.shape == (5, 12)
    linears = [m for m in ae.encoder if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [8, 6, 2]
    assert isinstance(ae.encoder[-1], nn.Linear)  # linear code


@pytest.mark.parametrize(("slope", "kind"), [(0.2, nn.LeakyReLU), (0.0, nn.ReLU)])
def test_mlp_activation(slope, kind):
    """An activation of the given slope after every hidden layer, none after the code or the output."""
    ae = MLPAutoencoder(4, hidden=(3, 5), latent_dim=2, slope=slope)
    for net, widths in ((ae.encoder, [3, 5, 2]), (ae.decoder, [5, 3, 4])):
        assert [type(m) for m in net] == [nn.Linear, kind, nn.Linear, kind, nn.Linear]
        assert [m.out_features for m in net if isinstance(m, nn.Linear)] == widths
        assert all(getattr(m, "negative_slope", 0.0) == slope for m in net if isinstance(m, kind))


@pytest.mark.parametrize(
    "make",
    [
        lambda: (ConvEncoder(1, 8), torch.rand(4, 1, 32, 32)),
        lambda: (ConvDecoder(12, 3), torch.randn(4, 12)),
        lambda: (ProtoEncoder(3, 32, (8, 16, 16), 32), torch.rand(4, 3, 32, 32)),
        lambda: (ProtoDecoder(6, 3, 32, (8, 16, 16)), torch.randn(4, 6)),
    ],
)
def test_conv_nets_are_channels_last_and_compute_what_nchw_computes(make, monkeypatch):
    """The conv nets keep their conv weights and feature maps channels-last (NHWC); their outputs
    and gradients equal those of the same weights run in the default NCHW layout."""
    torch.manual_seed(0)
    net, x = make()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    assert convs
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)

    def run(module):
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).sum().backward()
        return out, [m.weight.grad for m in module.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]

    out, grads = run(net)
    reference = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    for module in (conv_nets, protovae_nets):  # feature maps left in NCHW
        monkeypatch.setattr(module, "channels_last", lambda t: t.contiguous())
    want, want_grads = run(reference)
    assert all(g.is_contiguous() for g in want_grads)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):  # float32 sums in another order
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))
