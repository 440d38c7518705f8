"""Train the digits classifier behind FD-digits and write it into the package.

    python scripts/train_digits_classifier.py [--steps=1500] [--seed=0]

Writes ``deis_jax/evaluation/assets/digits_classifier.msgpack`` (the Flax parameters, ~150 kB)
and ``digits_classifier.json`` (train/test accuracy on the fixed 80/20 split, settings, sha256),
then prints the sha256 to pin as ``WEIGHTS_SHA256`` in
``deis_jax/evaluation/digits_classifier.py``. Takes seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deis_jax.evaluation import digits_classifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=digits_classifier.WEIGHTS_PATH)
    args = parser.parse_args()
    start = time.perf_counter()
    params, info = digits_classifier.train(seed=args.seed, steps=args.steps)
    info["train_seconds"] = round(time.perf_counter() - start, 1)
    info_path = os.path.splitext(args.out)[0] + ".json"
    digest = digits_classifier.save(params, info, args.out, info_path)
    print(
        f"train accuracy {info['train_accuracy']:.4f}, test accuracy {info['test_accuracy']:.4f} "
        f"({info['num_test']} held-out images), {info['train_seconds']} s"
    )
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) sha256 {digest}")
    if digest != digits_classifier.WEIGHTS_SHA256:
        print("pin it: WEIGHTS_SHA256 in deis_jax/evaluation/digits_classifier.py")


if __name__ == "__main__":
    main()
