"""Memorization ground truth on generated images (``projidx evaluate memorization``), per model and objective.

1,000 of scikit-learn's training digits plus 10 more planted 25 times each (1,250 rows, 8x8); two models trained on
that set: projidx's SmallUNet (``projidx train``'s recipe, 300 epochs, 3 checkpoints) and a diffusers
``UNet2DModel`` with attention trained by a plain diffusers loop (``benchmarks/train_diffusers_planted.py``, 150
epochs, 3 ``DDPMPipeline`` folders). 400 DDIM generations each (``--generate``; 96, the issue's count, leaves about
a dozen memorized generations, too few to tell 0.83 from 0.92: the report gives Wilson intervals); every store
setting is featurize's defaults but the objective (``--objectives``). For generations that reproduce a planted
digit (pixel nearest neighbour a copy, closer than 5% of unplanted digits are to theirs), the share with a copy
first / in the top-10, and for the other generations the share of the top-10 with the generation's digit (a
logistic-regression pixel classifier's label), per method, beside pixel nearest neighbours.

    python benchmarks/memorization.py --out bench-out/memorization      # ~30 min on 2 cores (models cached after)
    python benchmarks/memorization.py --out bench-out/memorization-heldout --data digits --base 1500 --seeds 0
        # held out: the 1,500 training digits as base, 10 test digits planted (other sources, other models)

Prints a table, writes OUT/memorization.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from projidx.data.datasets import load_dataset
from projidx.models.training import TrainConfig
from projidx.reports.evaluation import evaluate_memorization
from projidx.settings import FeaturizeConfig, MemorizationConfig

HERE = Path(__file__).resolve().parent
MODELS = {
    "smallunet": (TrainConfig(epochs=300, checkpoints=3), None),
    "diffusers": (TrainConfig(), f"{sys.executable} {HERE / 'train_diffusers_planted.py'} --data {{data_file}}"
                                 " --out {out} --epochs 150"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/memorization")
    p.add_argument("--cache", default=None)
    p.add_argument("--models", default="smallunet,diffusers")
    p.add_argument("--objectives", default="loss,dtrak")
    p.add_argument("--generate", type=int, default=400)
    p.add_argument("--seeds", default="0,1", help="generation seeds, each a set of --generate images")
    p.add_argument("--data", default="digits:train", help="base rows and sources (digits:test: a held-out set)")
    p.add_argument("--base", type=int, default=MemorizationConfig().base)
    args = p.parse_args()
    out = Path(args.out)
    data = load_dataset(args.data)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, start = [], time.perf_counter()
    for model in args.models.split(","):
        train_config, command = MODELS[model]
        for objective, seed in ((o, s) for o in args.objectives.split(",") for s in seeds):
            config = replace(MemorizationConfig(), generate=args.generate, seed=seed, base=args.base)
            report = evaluate_memorization(data, out / model, config, train_config,
                                           replace(FeaturizeConfig(), objective=objective), command, args.cache,
                                           progress=False)
            for method, row in report["methods"].items():
                if method == "pixel" and objective != args.objectives.split(",")[0]:
                    continue
                rows.append({"model": model, "data": args.data, "seed": seed,
                             "objective": "-" if method == "pixel" else objective,
                             "method": method, **row, "memorized": report["memorized"],
                             "classifier_accuracy": report["classifier_accuracy"]})
            print(f"{model} {objective} seed {seed}: {report['memorized']} of {report['generated']} generations"
                  f" reproduce a planted digit ({report['wall_s']:.0f}s)", flush=True)
    result = {"rows": rows, "wall_s": time.perf_counter() - start, "settings": vars(args)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "memorization.json").write_text(json.dumps(result, indent=1))
    print(f"{'model':<10} {'seed':>4} {'objective':<9} {'method':<12} {'top-1':>6} {'95% interval':>13} {'top-10':>7}"
          f" {'label agr.':>10}")
    for r in rows:
        interval = "-" if r["top1_interval"] is None else "[{:.2f}, {:.2f}]".format(*r["top1_interval"])
        cells = [r["top1"], interval, r["topk"], r["label_agreement"]]
        print(f"{r['model']:<10} {r['seed']:>4} {r['objective']:<9} {r['method']:<12} "
              + " ".join(f"{v if isinstance(v, str) else '-' if v is None else f'{v:.2f}':>{w}}"
                         for v, w in zip(cells, (6, 13, 7, 10), strict=True)))
    print(f"wall time {result['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
