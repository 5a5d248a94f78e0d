"""Mixed precision from synthetic images: top-1 against weight bits for the automatic choice at several budgets,
the uniform presets and a naive assignment, over seeds (:mod:`dfq_deploy.bench.mixed`).

The committed results:
    python experiments/mixed_precision.py --sources dfqvit --seeds 3 --synth-iters 200 --limit 1000 --threads 1
    python experiments/mixed_precision.py --tiny swin --sources dfqvit --seeds 3 --synth-iters 200 --limit 1000 \
        --threads 1
Writes ``experiments/results/mixed-<model>[-tiny][tag].json``, ``.md`` and ``.png``; a tiny random-weight model is
scored by top-1 agreement with its float graph (its labels mean nothing).
"""

from dfq_deploy.bench.mixed import main

if __name__ == "__main__":
    main()
