"""How well a GaussianMixture clusters the codes of VaDE's pretrained autoencoder (MNIST).

VaDE (configs/vade_mnist_paper.yaml) fits a diagonal GaussianMixture on the codes of its
pretrained autoencoder and stays in that basin; this script measures the basin alone: it
pretrains the same 784-500-500-2000-10 network the same way (Bernoulli reconstruction, Adam
2e-3, batch 100, bf16 autocast), and every 5 epochs fits the mixture on the training codes and
scores its test clusters (Hungarian ACC). ``dae`` masks 20% of the input pixels during
pretraining (the corruption of a stacked denoising autoencoder).

    OMP_NUM_THREADS=1 PROTOS_DATA_DIR=../shared/data python benchmarks/vade_pretraining.py base 0 --epochs 20

Prints one JSON line per checkpoint (variant, seed, epoch, acc).
"""

from __future__ import annotations

import argparse
import json

import torch
from sklearn.mixture import GaussianMixture

from lightning_protos.data import MNIST
from lightning_protos.eval.metrics import clustering_scores
from lightning_protos.methods.vade import VaDE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=["base", "dae"])
    parser.add_argument("seed", type=int)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = MNIST(batch_size=100, fit_on="train")
    data.setup("fit")
    x_train, x_test, y_test = data.features("fit"), data.features("eval"), data.labels("eval").numpy()
    vade = VaDE(
        n_clusters=10, latent_dim=10, network="mlp", hidden=[500, 500, 2000], reconstruction="bce", beta=10 / 784
    )
    optimizer = torch.optim.Adam([*vade.encoder.parameters(), *vade.decoder.parameters()], lr=2e-3)
    for epoch in range(1, args.epochs + 1):
        vade.train()
        for index in torch.randperm(len(x_train)).split(100):
            x = vade.to_net(x_train[index])
            x_in = x * (torch.rand_like(x) > 0.2) if args.variant == "dae" else x
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = vade.reconstruct(vade.encoder(x_in)[0])
            optimizer.zero_grad()
            vade.reconstruction_loss(x, out).backward()
            optimizer.step()
        if epoch % 5 == 0:
            gmm = GaussianMixture(10, covariance_type="diag", random_state=args.seed)
            gmm.fit(vade.embed_all(x_train).double().numpy())
            pred = gmm.predict(vade.embed_all(x_test).double().numpy())
            acc = clustering_scores(y_test, pred)["acc"]
            row = {"variant": args.variant, "seed": args.seed, "epoch": epoch, "acc": round(acc, 4)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
