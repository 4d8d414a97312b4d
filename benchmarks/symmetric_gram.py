"""The Gram matrix `xᵀx` of K-FAC's factor sums: the plain product against `kfac_statistics.symmetric_gram` (each
off-diagonal block formed once and mirrored), on one thread, for the widths of the demo's layers and wider.

    python -m benchmarks.symmetric_gram [--rows 2048] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_unlearn.curvature.kfac_statistics import symmetric_gram


def milliseconds(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| columns | x.T @ x (ms) | symmetric_gram (ms) |\n|---|---|---|")
    for columns in (129, 385, 513, 1025, 2049):
        x = torch.randn(args.rows, columns)
        plain = milliseconds(lambda t: t.T @ t, x, args.repeats)
        mirrored = milliseconds(symmetric_gram, x, args.repeats)
        print(f"| {columns} | {plain:.1f} | {mirrored:.1f} |")


if __name__ == "__main__":
    main()
