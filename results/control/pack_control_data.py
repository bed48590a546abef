"""Write a small CIFAR-10 for the device run of ``aflkd control`` (results/control/device_control.sh).

The device machine reaches no network and takes at most 64 MiB of carried files, and the
project's CIFAR-10 (121 MB compressed) does not fit.  Timing the controller needs images that
compress like photos, not the whole split: ``--train`` training images and ``--test`` test
images, class-balanced (the packed arrays are sorted by class), are enough (``control --size 500`` draws a class-balanced subset; test
accuracy is reported but not compared).  Usage, from the repository root::

    .venv/bin/python results/control/pack_control_data.py --out .dev/control-data
"""
import argparse
import io
import lzma
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kd.datasets import balanced_subset, load_dataset  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--test", type=int, default=2000)
    args = p.parse_args()
    d = load_dataset("cifar10", args.data_root)
    train = np.sort(balanced_subset(d.y_train, args.train, d.classes, seed=0))
    test = np.sort(balanced_subset(d.y_test, args.test, d.classes, seed=0))
    buf = io.BytesIO()
    np.savez(buf, x_train=d.x_train[train], y_train=d.y_train[train], x_test=d.x_test[test], y_test=d.y_test[test])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cifar10.npz.xz").write_bytes(lzma.compress(buf.getvalue(), preset=6))
    counts = np.bincount(d.y_train[train], minlength=d.classes)
    print(f"wrote {out / 'cifar10.npz.xz'} ({(out / 'cifar10.npz.xz').stat().st_size / 2**20:.1f} MiB): "
          f"{args.train} training images (per class {counts.min()}..{counts.max()}), {args.test} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
