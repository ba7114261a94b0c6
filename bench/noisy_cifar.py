"""Noisy CIFAR-10: Swift Sampler against peers on one training budget.

Same as ``swift-sampler bench noisy-cifar``; run ``python bench/noisy_cifar.py --help``.
Example (about an hour on two CPU cores):

    python bench/noisy_cifar.py --data ../shared/datasets/cifar10/train --out results/noisy-cifar
"""

from __future__ import annotations

import sys

from swift_sampler.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "noisy-cifar", *sys.argv[1:]]))
