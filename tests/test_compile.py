"""``--compile.enabled``: which networks are compiled, that compiled training takes the same
steps as eager training, that its checkpoints load into a plain model, and its one-line errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_cli import digits, protos_error, run_main
from test_vaesim import SMALL, fit, tiny_images, vaesim

from lightning_protos import compile as compile_mod
from lightning_protos.compile import Compile, compile_targets
from lightning_protos.errors import ProtosError
from lightning_protos.methods.aecm import AECM
from lightning_protos.methods.gmvae import GMVAE
from lightning_protos.methods.protovae import AE, InfoVAE, ProtoVAE
from lightning_protos.methods.vade import VaDE
from lightning_protos.methods.vae import VAE
from lightning_protos.methods.vaesim import VAESim


def test_targets_are_the_named_modules_or_the_methods_conv_nets():
    model = AECM(n_clusters=3, input_shape=(8,), latent_dim=2, hidden=(6,))
    named = compile_targets(model, ["ae.encoder", "cm"])
    assert [m for _, m in named] == [model.ae.encoder, model.cm]
    assert compile_targets(model, None) == []  # fully connected: nothing by default
    assert [n for n, _ in compile_targets(VAESim(**SMALL), None)] == ["encoder", "decoder"]
    assert compile_targets(VAE(network="mlp", input_shape=(1, 28, 28)), None) == []
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    assert [n for n, _ in compile_targets(plain, None)] == ["0"]  # no compile_modules: the conv children
    with pytest.raises(ProtosError, match=r"names no submodule ae\.encodr \(the method has ae, cm, average\)"):
        compile_targets(model, ["ae.encodr"])
    with pytest.raises(ProtosError, match=r"compile.mode must be one of default, .*max-autotune; got 'max_autotune'"):
        Compile(mode="max_autotune")  # before any data is loaded
    assert Compile(mode="max-autotune").mode == "max-autotune"


@pytest.mark.parametrize(
    ("method", "networks"),
    [
        (VAESim, ["encoder", "decoder"]),
        (VAE, ["encoder", "decoder"]),
        (VaDE, ["encoder", "decoder"]),
        (GMVAE, ["encoder.features", "decoder"]),  # its steps call the encoder's trunk, not encoder()
        (ProtoVAE, ["encoder", "decoder"]),
        (AE, ["encoder", "decoder"]),
        (InfoVAE, ["encoder", "decoder"]),
    ],
)
def test_each_conv_method_compiles_the_conv_nets_its_steps_call(method, networks):
    model = method()
    targets = compile_targets(model, None)
    assert [n for n, _ in targets] == networks
    assert all(any(True for _ in m.parameters()) for _, m in targets)


def train(compiled: bool, tmp_path) -> tuple[VAESim, L.Trainer]:
    model = vaesim(input_shape=(1, 32, 32))
    trainer = fit(
        model, tiny_images(size=32), callbacks=[Compile(enabled=compiled)], enable_checkpointing=True,
        default_root_dir=tmp_path,
    )  # fmt: skip
    return model, trainer


@pytest.mark.slow
def test_compiled_training_takes_the_eager_steps_and_checkpoints_load_into_a_plain_model(tmp_path):
    eager, _ = train(False, tmp_path / "eager")
    compiled, trainer = train(True, tmp_path / "compiled")
    assert compiled.encoder._compiled_call_impl is not None
    assert compiled.decoder._compiled_call_impl is not None
    assert eager.encoder._compiled_call_impl is None
    # 4 Adam steps on the same batches and noise: the same weights and prototypes up to the
    # order of float sums in the fused kernels
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-4, rtol=1e-3, msg=name)
    ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    plain = vaesim(input_shape=(1, 32, 32))
    plain.load_state_dict(state)  # strict
    x = torch.rand(5, 1, 32, 32)
    compiled.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.embed(x), compiled.embed(x), atol=1e-5, rtol=1e-4)


def test_cli_errors_before_training_and_warns_where_nothing_is_compiled(tmp_path, capsys, monkeypatch):
    args = ["fit", *digits(tmp_path)]
    code, _, err = run_main([*args, "--compile.enabled", "true", "--compile.modules", "[encoder]"], capsys)
    assert code == 1
    assert "compile.modules names no submodule encoder (the method has cm, average)" in protos_error(err)
    monkeypatch.setattr(compile_mod.shutil, "which", lambda _: None)
    code, _, err = run_main([*args, "--compile.enabled", "true", "--compile.modules", "[cm]"], capsys)
    assert code == 1
    assert "needs a C++ compiler" in protos_error(err)
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained
    short = ["--trainer.max_epochs", "1", "--final_test", "false"]
    with pytest.warns(UserWarning, match="CM compiles nothing"):
        code, _, err = run_main([*args, *short, "--compile.enabled", "true"], capsys)  # no compiler needed
    assert code == 0, err
