"""Fixed per-op cost of tinymeta, in microseconds, next to raw NumPy doing the same arithmetic.

On 1-element tensors the arithmetic costs nearly nothing, so what is timed is
the framework: building the graph node, wrapping arrays in tensors, walking
the graph backward. Cases:

  op forward (recorded)   y = x * 2 with x requiring grad (a Function node is made)
  op forward (no_grad)    the same inside tm.no_grad() (no node)
  forward + backward      y = x * 2; y.backward()   vs   y = x * 2; gx = ones * 2
  grad, create_graph      g = tm.grad(tanh(x) * x, x, create_graph=True)
                          vs  t = tanh(x); y = t * x; g = (1 - t * t) * x + t
  grad of grad            d/dx of the above g (a second backward through the first)

    python benchmarks/bench_overhead.py --repeats 50 --warmup 5 --inner 2000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    base_parser,
    describe_machine,
    median,
    noise_warning,
    setup_threads,
    spread,
    time_interleaved,
)


def cases(tm, np) -> list:
    """(name, tinymeta fn, numpy fn, arithmetic check) for each case."""
    xa = np.array([0.7], dtype=np.float32)
    x = tm.tensor(xa, requires_grad=True)
    ones = np.ones_like(xa)

    def tm_forward():
        return x * 2.0

    def tm_forward_no_grad():
        with tm.no_grad():
            return x * 2.0

    def np_forward():
        return xa * 2.0

    def tm_fwd_bwd():
        x.grad = None
        y = x * 2.0
        y.backward()
        return x.grad

    def np_fwd_bwd():
        y = xa * 2.0  # noqa: F841 - the forward is part of the work
        return ones * 2.0

    def tm_grad_create_graph():
        y = tm.tanh(x) * x
        (g,) = tm.grad(y, x, create_graph=True)
        return g

    def np_grad():
        t = np.tanh(xa)
        y = t * xa  # noqa: F841
        return (1 - t * t) * xa + t

    def tm_grad_of_grad():
        y = tm.tanh(x) * x
        (g,) = tm.grad(y, x, create_graph=True)
        (gg,) = tm.grad(g, x)
        return gg

    def np_grad_of_grad():
        t = np.tanh(xa)
        y = t * xa  # noqa: F841
        g = (1 - t * t) * xa + t  # noqa: F841
        d = 1 - t * t
        return 2 * d - 2 * t * d * xa

    return [
        ("op forward (recorded)", tm_forward, np_forward),
        ("op forward (no_grad)", tm_forward_no_grad, np_forward),
        ("forward + backward", tm_fwd_bwd, np_fwd_bwd),
        ("grad, create_graph=True", tm_grad_create_graph, np_grad),
        ("grad of grad", tm_grad_of_grad, np_grad_of_grad),
    ]


def check(tm, np, table) -> None:
    """The tinymeta and NumPy versions compute the same numbers."""
    for name, tm_fn, np_fn in table:
        got = tm_fn()
        got = got.numpy() if isinstance(got, tm.Tensor) else got
        np.testing.assert_allclose(got, np_fn(), rtol=1e-5, err_msg=name)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], repeats=50, warmup=5)
    parser.add_argument("--inner", type=int, default=2000, help="calls per timed sample")
    args = parser.parse_args()
    threads = setup_threads(args.threads)

    import numpy as np

    import tinymeta as tm

    print("Fixed overhead on 1-element float32 tensors")
    print(describe_machine(threads, args.clock))
    table = cases(tm, np)
    check(tm, np, table)

    print(
        f"\nmedian of {args.repeats} samples x {args.inner} calls, after {args.warmup} warm-up "
        "samples (microseconds per call):"
    )
    print(f"{'case':26s} {'tinymeta':>9s} {'IQR':>13s} {'numpy':>7s} {'ratio':>7s}")
    for name, tm_fn, np_fn in table:
        samples = time_interleaved(
            {"tm": tm_fn, "np": np_fn},
            repeats=args.repeats,
            warmup=args.warmup,
            inner=args.inner,
            clock=args.clock,
        )
        t_tm, t_np = median(samples["tm"]) * 1e6, median(samples["np"]) * 1e6
        iqr = spread([s * 1e6 for s in samples["tm"]])
        print(f"{name:26s} {t_tm:9.2f} {iqr:>13s} {t_np:7.2f} {t_tm / t_np:7.1f}")
        warning = noise_warning(samples)
        if warning:
            print(f"  {warning}")


if __name__ == "__main__":
    main()
