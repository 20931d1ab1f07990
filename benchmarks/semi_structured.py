"""Does the 2:4 pattern make an LLM's layers faster on a GPU? SmolLM2-135M's projections, dense against 2:4
semi-structured (``torch.sparse.to_sparse_semi_structured``), fp16, on CUDA only.

Wanda's ``n_m: [2, 4]`` keeps 2 of every 4 consecutive inputs of each row: the pattern sparse tensor
cores (Ampere and later) run at up to twice the dense rate. Speed does not depend on which weights
survive, so the weights here are random in SmolLM2-135M's shapes (hidden 576, FFN 1536, 9 query and
3 key/value heads of 64; every projection of a decoder layer), masked by the same rule as the
wanda strategy (the 2 of each 4 with the largest ``|W|``). For each projection and each token count
(1 x 128 and 8 x 128 prefill, 512 x 128), the dense and then the semi-structured matrix are
timed (CUDA events, median of ``--repeats`` after warm-up), and their outputs compared. Prints a table,
writes JSON.

    python benchmarks/semi_structured.py     # under a minute on one GPU; refuses to run without CUDA
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from common import add_output_arguments, benchmark_parser, machine, report, settings

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "semi_structured.json"
HIDDEN, FFN, KV = 576, 1536, 192
PROJECTIONS = {  # name: (inputs, outputs) of one SmolLM2-135M decoder layer's projections
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj / v_proj": (HIDDEN, KV),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj / up_proj": (HIDDEN, FFN),
    "down_proj": (FFN, HIDDEN),
    "a 7B model's up_proj, for scale": (4096, 11008),
}
# torch dispatches 2:4 to cuSPARSELt; its other kernel (CUTLASS) runs on compute capability 8.x only, not on
# Hopper.
TOKENS = (128, 1024, 65536)


def parse_args(argv=None):
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    add_output_arguments(parser, DEFAULT_OUTPUT, "smoke run: 5 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 5
    return args


def two_four(weight):
    """The 2 largest-magnitude of every 4 consecutive inputs of each row kept, the rest zero."""
    import torch

    groups = weight.abs().unflatten(1, (-1, 4))
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    return weight * keep.flatten(1)


def timed(weight, inputs, repeats: int) -> float:
    """Median milliseconds of ``linear(inputs, weight)`` over ``repeats`` runs after warm-up, by CUDA
    events."""
    import torch
    from torch.nn.functional import linear

    for _ in range(5):
        linear(inputs, weight)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        linear(inputs, weight)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> None:
    import torch
    from torch.nn import functional
    from torch.sparse import to_sparse_semi_structured

    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("semi_structured.py measures sparse tensor cores: it needs a CUDA GPU")
    torch.manual_seed(0)
    rows = []
    for name, (inputs, outputs) in PROJECTIONS.items():
        dense = two_four(torch.randn(outputs, inputs, device="cuda", dtype=torch.float16))
        sparse = to_sparse_semi_structured(dense)
        for tokens in TOKENS:
            x = torch.randn(tokens, inputs, device="cuda", dtype=torch.float16)
            error = (functional.linear(x, sparse) - functional.linear(x, dense)).abs().max().item()
            dense_ms = timed(dense, x, args.repeats)
            sparse_ms = timed(sparse, x, args.repeats)
            rows.append(
                {
                    "projection": name,
                    "shape": [outputs, inputs],
                    "tokens": tokens,
                    "dense_ms": round(dense_ms, 4),
                    "sparse_ms": round(sparse_ms, 4),
                    "speedup": round(dense_ms / sparse_ms, 3),
                    "max_abs_difference": error,
                }
            )
    lines = ["| projection | tokens | dense ms | 2:4 ms | speed-up |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['projection']} | {r['tokens']} | {r['dense_ms']:.4f} | "
        f"{r['sparse_ms']:.4f} | {r['speedup']:.2f}x |"
        for r in rows
    ]
    result = {
        "settings": settings(args),
        "machine": machine(gpu=torch.cuda.get_device_name()),
        "rows": rows,
    }
    report(result, args.output, "\n".join(lines))


if __name__ == "__main__":
    main()
