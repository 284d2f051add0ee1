"""How well a GaussianMixture clusters the codes of VaDE's pretrained autoencoder (MNIST).

VaDE (configs/vade_mnist_paper.yaml) fits a diagonal GaussianMixture on the codes of its
pretrained autoencoder and stays in that basin; this script measures the basin alone: it
pretrains the same 784-500-500-2000-10 network on the same loss (Bernoulli reconstruction of
the posterior mean's decoding, Adam 2e-3, batch 100, bf16 autocast where the CPU has it), and
every ``--every`` epochs fits the mixture on the training codes as VaDE does (``VaDE.fit_mixture``) and scores
VaDE's test clusters under it (Hungarian ACC).
``dae`` masks 20% of the input pixels during pretraining (the corruption of a stacked denoising
autoencoder); ``mse`` pretrains on VaDE's own squared-error reconstruction (``reconstruction:
mse``) instead of the Bernoulli loss, the DEC family's pretraining loss (``methods.pretrain``). Seeded by
``torch.manual_seed``, so a seed here is not the bench's run of it.

    OMP_NUM_THREADS=1 PROTOS_DATA_DIR=../shared/data python benchmarks/vade_pretraining.py base 0 --epochs 20

Prints one JSON line per checkpoint (variant, seed, epoch, acc).
"""

from __future__ import annotations

import argparse
import json

import torch

from lightning_protos.data import MNIST
from lightning_protos.eval.metrics import clustering_scores
from lightning_protos.hardware import cpu_has_native_bf16
from lightning_protos.methods.vade import VaDE

MASKED = 0.2  # share of input pixels the ``dae`` variant zeroes


def corrupt(x: torch.Tensor, variant: str) -> torch.Tensor:
    """The pretraining input: ``x`` itself (``base``) or with a random ``MASKED`` share of its
    entries zeroed (``dae``)."""
    return x * (torch.rand_like(x) >= MASKED) if variant == "dae" else x


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=["base", "dae", "mse"])
    parser.add_argument("seed", type=int)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="fit and score the mixture every this many epochs")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--precision",
        choices=["bf16", "32"],
        default="bf16" if cpu_has_native_bf16() else "32",
        help="autocast dtype (default: bf16 where the CPU has it in hardware)",
    )
    parser.add_argument("--n", type=int, default=None, help="train on the first n training images (default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    data = MNIST(batch_size=100, fit_on="train")
    data.setup("fit")
    x_train, x_test, y_test = data.features("fit")[: args.n], data.features("eval"), data.labels("eval").numpy()
    vade = VaDE(
        n_clusters=10,
        latent_dim=10,
        network="mlp",
        hidden=[500, 500, 2000],
        beta=10 / 784,
        reconstruction="mse" if args.variant == "mse" else "bce",
    )
    optimizer = torch.optim.Adam([*vade.encoder.parameters(), *vade.decoder.parameters()], lr=2e-3)
    rows = []
    for epoch in range(1, args.epochs + 1):
        vade.train()
        for index in torch.randperm(len(x_train)).split(args.batch_size):
            x = vade.to_net(x_train[index])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                out = vade.reconstruct(vade.encoder(corrupt(x, args.variant))[0])
            optimizer.zero_grad()
            vade.reconstruction_loss(x, out).backward()
            optimizer.step()
        if epoch % args.every == 0:
            vade.fit_mixture(vade.embed_all(x_train))  # VaDE's own step 2, seeded by args.seed
            with torch.no_grad():
                pred = vade.predict_clusters(x_test)
            rows.append(
                {
                    "variant": args.variant,
                    "seed": args.seed,
                    "epoch": epoch,
                    "acc": round(clustering_scores(y_test, pred)["acc"], 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
