"""Validate the data-free accuracy estimate against measured top-1 drops on the accuracy grid.

Runs the grid (:mod:`dfq_deploy.bench.grid`, same flags, same cache) and compares each cell's predicted drop
(held-back synthetic probes, no labels) with its measured drop on ``dev`` (:mod:`dfq_deploy.bench.estimator`).
The committed results:
    python experiments/estimator.py --sources dfqvit,spdfq,psaq,noise,real \
        --presets W8A8,W4A16,W3A16,W2A16,W6A6,W5A5,W4A4,W4A3,W3A3 --seeds 3 --synth-iters 200 --limit 1000 --threads 1
Writes ``experiments/results/estimator-<model>.json``, ``.md`` and ``.png``.
"""

from dfq_deploy.bench.estimator import main

if __name__ == "__main__":
    main()
