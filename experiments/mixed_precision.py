"""Mixed precision from synthetic images: top-1 against weight bits for the automatic choice at several budgets,
the uniform presets and a naive assignment, over seeds (:mod:`dfq_deploy.bench.mixed`).

The committed results:
    python experiments/mixed_precision.py --sources dfqvit --seeds 3 --synth-iters 200 --limit 1000 --threads 1
    python experiments/mixed_precision.py --model swin_t --random-weights \
        --model-kwargs img_size=32,patch_size=2,window_size=4,embed_dim=32,depths=2-2,num_heads=2-4,num_classes=10 \
        --sources dfqvit --seeds 3 --synth-iters 200 --limit 1000 --threads 1 --tag=-tiny
Writes ``experiments/results/mixed-<model>[tag].json``, ``.md`` and ``.png``.
"""

from dfq_deploy.bench.mixed import main

if __name__ == "__main__":
    main()
