"""Accuracy grid: every calibration source x every preset x several seeds, on the artifact that ships.

The harness is :mod:`dfq_deploy.bench.grid`; see its docstring for the protocol. Usage:
    python experiments/accuracy.py                       # full grid on the bundled model, 3 seeds, all of dev
    python experiments/accuracy.py --synth-iters 200 --limit 1000 --threads 1   # the committed results (README)
    python experiments/accuracy.py --quick               # one seed, 500 images, 100 synthesis iterations
Writes ``experiments/results/accuracy-<model>[-quick].json``, ``.md`` and ``.png``.
"""

from dfq_deploy.bench.grid import main

if __name__ == "__main__":
    main()
