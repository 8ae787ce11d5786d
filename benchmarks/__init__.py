"""mmcache's benchmarks against the alternatives, side by side in one run.

Run from the repository root: ``python -m benchmarks --quick`` (~2 minutes, results in
``benchmarks/results/quick/``), ``--smoke`` (CI's smoke test: every workload once on tiny
data, ``benchmarks/results/smoke/``) or ``python -m benchmarks --full`` (under 30
minutes, the committed ``benchmarks/results/``). Workloads: sharing one frame with N workers
(``_sharing``), open latency vs size and vs column count and save throughput (``_latency``).
Worker code lives in ``_workers`` so spawn and forkserver children can import it.
"""
