"""Featurize throughput at real image sizes, against training and against plain forward + backward (issue 9, item 0).

Two parts, each alternating its variants over ``--reps`` rounds in one run (medians reported, the load average
recorded before every measurement; this machine is shared):

- **whole process, 28x28x1** (``--whole``): ``projidx train`` of the default SmallUNet on N upscaled training
  digits for E epochs (N E training samples), then ``projidx featurize --train-timesteps grid --timesteps 4
  --proj-dim 2048`` of N held-out upscaled digits (4 N gradients) with ``sjlt``, ``factorized`` and ``auto``;
  samples/s are each command's own wall clock, start-up included. With ``--baseline-src DIR`` (a checkout of the
  code before this change, e.g. ``git archive main | tar -x -C DIR``) the same featurize commands also run with
  that code (PYTHONPATH), so before and after come from the same run.
- **in process** (``--models``): per model, plain batched forward + backward of the summed loss (the cost of
  training a sample) against featurization as projidx.features.featurization does it (gradients + projection + exact
  norms, one batch): the default source (layer hooks, one batched pass) with ``sjlt`` and ``factorized``, and
  the earlier paths, torch.func ``vmap`` + ``sjlt`` and ``factorized`` from factors at every layer. The hooks
  path is also split into its parts: the capture (forward + backward to the layer outputs), the per-sample
  gradients formed from it, and the projection.
- **per-layer kernels** (``--kernels``): per distinct Conv2d shape of each model, the per-sample weight-gradient
  kernels of projidx.features.factorized (shifted GEMMs, grouped convolution, unfolded product, and a loop of one
  weight-gradient convolution per sample) against the batched weight gradient of plain training (not per sample:
  the same multiply-adds in one call), medians of alternating rounds, and the kernel ``conv_weight_grads`` picks.

Run from the repository root: .venv/bin/python benchmarks/bench_throughput.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from projidx.data.datasets import load_dataset
from projidx.features import factorized
from projidx.features.factorized import FactorizedGradients
from projidx.features.grads import GradientComputer, parameter_shapes
from projidx.features.projection import ProjectorSpec, make_projector
from projidx.models.diffusion import NoiseSchedule, diffusion_loss
from projidx.models.unet import SmallUNet, UNetConfig

K = 2048
FEATURIZE = ["--train-timesteps", "grid", "--timesteps", "4", "--proj-dim", str(K)]


@dataclass(frozen=True)
class Model:
    name: str
    unet: UNetConfig
    shape: tuple[int, int, int]
    batch: int  # gradient evaluations per call (featurize's --batch-size counts these)
    groups: int  # timesteps per sample in one call (grid mode), as featurize batches them


MODELS = {
    "demo-8x8": Model("demo-8x8", UNetConfig(base=32), (1, 8, 8), 32, 4),
    "default-28x28": Model("default-28x28", UNetConfig(base=32), (1, 28, 28), 32, 4),
    "10.7M-32x32x3": Model("10.7M-32x32x3", UNetConfig(channels=3, base=136, mults=(1, 2, 2)), (3, 32, 32), 8, 1),
}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def upscaled(spec: str, n: int, size: int) -> np.ndarray:
    """(n, 1, size, size) float32 digits in [-1, 1], bilinearly upscaled (a stand-in for real 28x28 digits)."""
    images = load_dataset(spec).images[:n]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1).numpy()


def run_cli(args: list[str], cwd: Path, src: str | None) -> float:
    """Wall seconds of ``python -m projidx ARGS`` (from ``cwd``, with ``src`` first on PYTHONPATH if given)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    if src is not None:
        env["PYTHONPATH"] = src
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "projidx", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"projidx {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def whole_process(n: int, epochs: int, reps: int, baseline: str | None, log: Callable[[str], None]) -> dict:
    """Train vs featurize samples/s, whole processes, alternating every variant each round."""
    here = str(Path(__file__).resolve().parents[1])
    sources = {"": here, **({" (before)": baseline} if baseline else {})}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        held = upscaled("digits:test", n, 28)  # digits:test has 297 images
        np.savez(work / "train.npz", images=upscaled("digits:train", n, 28), ids=np.arange(n))
        np.savez(work / "held.npz", images=held, ids=np.arange(len(held)))
        train = ["train", "--data", "train.npz", "--out", "ck", "--epochs", str(epochs), "--checkpoints", "1",
                 "--force"]
        run_cli(train, work, here)
        variants: dict[str, tuple[list[str], str, int]] = {"train": (train, here, n * epochs)}
        for suffix, src in sources.items():
            for kind in ("sjlt", "factorized", "auto"):
                if suffix and kind == "auto":
                    continue  # before this change auto was factorized
                store = f"s-{kind}{suffix.strip(' ()')}.zarr"
                args = ["featurize", "--checkpoints", "ck", "--data", "held.npz", "--store", store,
                        "--projector", kind, *FEATURIZE]
                variants[f"featurize {kind}{suffix}"] = (args, src, 4 * len(held))
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for rep in range(reps):
            for name, (args, src, samples) in variants.items():
                if name.startswith("featurize"):
                    subprocess.run(["rm", "-rf", str(work / args[args.index("--store") + 1])], check=True)
                before = load()
                seconds = run_cli(args, work, src)
                runs[name].append({"seconds": seconds, "samples_per_s": samples / seconds, "load_before": before})
                log(f"  round {rep + 1} {name:<30} {seconds:6.1f} s  {samples / seconds:7.1f}/s  load {before}")
    med = {name: statistics.median(r["samples_per_s"] for r in rs) for name, rs in runs.items()}
    ratios = {name: med[name] / med["train"] for name in med if name != "train"}
    ratios["auto / sjlt"] = med["featurize auto"] / med["featurize sjlt"]
    return {"n_train": n, "n_featurized": len(held), "epochs": epochs, "featurize_args": FEATURIZE, "runs": runs,
            "median_samples_per_s": med,
            "ratios_vs_train": ratios}


def timed_rounds(fns: dict[str, Callable[[], object]], reps: int, per: int) -> tuple[dict, dict]:
    """Median seconds per gradient of each fn (``per`` gradients a call), alternating them every round."""
    for fn in fns.values():
        fn()  # warm-up: oneDNN primitives, projector hashes
    times: dict[str, list[float]] = {name: [] for name in fns}
    loads: dict[str, list[list[float]]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            loads[name].append(load())
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / per)
    return {name: statistics.median(v) for name, v in times.items()}, loads


def model_and_batch(model_cfg: Model) -> tuple[SmallUNet, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model (seeded weights, eval mode) and one seeded batch x0 (B, C, H, W), t (B,), eps (B, 1, C, H, W)."""
    torch.manual_seed(0)
    model = SmallUNet(model_cfg.unet).eval()
    gen = torch.Generator().manual_seed(0)
    b = model_cfg.batch
    x0 = torch.rand(b, *model_cfg.shape, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (b,), generator=gen)
    eps = torch.randn(b, 1, *model_cfg.shape, generator=gen)
    return model, x0, t, eps


def in_process(model_cfg: Model, reps: int, log: Callable[[str], None]) -> dict:
    model, x0, t, eps = model_and_batch(model_cfg)
    schedule = NoiseSchedule()
    b = model_cfg.batch
    vmap = GradientComputer(model, schedule, "mse")
    hooks = FactorizedGradients(model, schedule, "mse")
    shapes = parameter_shapes(model)
    sjlt = make_projector(ProjectorSpec("sjlt", K, shapes))
    fact = make_projector(ProjectorSpec("factorized", K, shapes))
    g = model_cfg.groups

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        diffusion_loss(model, x0, t, eps[:, 0], vmap.abar, "mse").sum().backward()

    def factors_everywhere() -> object:
        with mock.patch.object(factorized, "factors_are_cheaper", lambda *args: True):
            return hooks.project(fact, x0, t, eps, g)

    fns = {
        "plain fwd+bwd": plain,
        "sjlt (hooks)": lambda: hooks.project(sjlt, x0, t, eps, g),
        "factorized (cost model)": lambda: hooks.project(fact, x0, t, eps, g),
        "sjlt (vmap, before)": lambda: vmap.project(sjlt, x0, t, eps, g),
        "factorized (factors everywhere, before)": factors_everywhere,
        "hooks: capture only": lambda: hooks.capture(x0, t, eps),
        "hooks: capture + per-sample gradients": lambda: hooks.per_sample(x0, t, eps),
        "vmap: per-sample gradients": lambda: vmap.per_sample(x0, t, eps),
    }
    seconds, loads = timed_rounds(fns, reps, b)
    plain_s = seconds["plain fwd+bwd"]
    rows = {name: {"s_per_grad": s, "per_s": 1 / s, "x_plain": plain_s / s, "load_before": loads[name]}
            for name, s in seconds.items()}
    for name, r in rows.items():
        log(f"  {model_cfg.name:<14} {name:<42} {r['per_s']:8.1f}/s  {r['x_plain']:5.2f}x plain")
    return {"params": sum(p.numel() for p in model.parameters()), "image_shape": list(model_cfg.shape),
            "batch": b, "groups": g, "rows": rows,
            "auto_over_sjlt": seconds["sjlt (hooks)"] / seconds["factorized (cost model)"],
            "hooks_over_vmap_sjlt": seconds["sjlt (vmap, before)"] / seconds["sjlt (hooks)"]}


def _loop_weight_grads(module: torch.nn.Conv2d, inputs: torch.Tensor, outgrads: torch.Tensor,
                       batch: int) -> torch.Tensor:
    """One weight-gradient convolution per sample (the kernel the batched pass uses, B times)."""
    draws = inputs.shape[0] // batch
    return torch.stack([torch.nn.grad.conv2d_weight(inputs[b * draws:(b + 1) * draws], module.weight.shape,
                                                    outgrads[b * draws:(b + 1) * draws], module.stride,
                                                    module.padding, module.dilation) for b in range(batch)])


KERNELS = {"shifted": factorized.shifted_weight_grads, "grouped": factorized.grouped_weight_grads,
           "unfolded": factorized.unfolded_weight_grads, "loop": _loop_weight_grads}


def kernels(model_cfg: Model, reps: int, log: Callable[[str], None]) -> dict:
    """Per distinct Conv2d shape: ms per batch of each per-sample weight-gradient kernel, and of the batched one."""
    model, x0, t, eps = model_and_batch(model_cfg)
    b = model_cfg.batch
    capture = FactorizedGradients(model, NoiseSchedule(), "mse").capture(x0, t, eps)
    layers: dict[str, dict] = {}
    for calls in capture.calls.values():
        m = calls[0].module
        if not isinstance(m, torch.nn.Conv2d):
            continue
        x, o = calls[0].input, calls[0].outgrad
        key = f"{tuple(m.weight.shape)} at {tuple(o.shape[2:])} stride {m.stride[0]}"
        if key in layers:
            layers[key]["layers"] += 1
            continue
        fns: dict[str, Callable[[], object]] = {"batched (not per sample)": lambda m=m, x=x, o=o: (
            torch.nn.grad.conv2d_weight(x, m.weight.shape, o, m.stride, m.padding, m.dilation))}
        for kname, kernel in KERNELS.items():
            if kname != "shifted" or m.stride == (1, 1):
                fns[kname] = lambda kernel=kernel, m=m, x=x, o=o: kernel(m, x, o, b)
        seconds, _ = timed_rounds(fns, reps, 1)
        chosen = next(k for k, f in KERNELS.items() if f is factorized.conv_weight_kernel(m))
        layers[key] = {"layers": 1, "ms": {k: 1e3 * v for k, v in seconds.items()}, "chosen": chosen}
        log(f"  {model_cfg.name:<14} {key:<36} " + " ".join(f"{k.split()[0]} {v * 1e3:6.1f}"
                                                              for k, v in seconds.items()) + f"  -> {chosen}")
    totals = {k: sum(r["layers"] * r["ms"].get(k, r["ms"][r["chosen"]]) for r in layers.values())
              for k in ["batched (not per sample)", *KERNELS]}
    totals["chosen"] = sum(r["layers"] * r["ms"][r["chosen"]] for r in layers.values())
    return {"batch": b, "layers": layers, "total_ms": totals,
            "note": "totals over every conv layer; a kernel that does not apply (shifted on a strided layer)"
                    " counts as the chosen one"}


def main() -> None:
    if os.environ.get("OMP_WAIT_POLICY") is None:
        # OpenMP threads that spin while waiting slow torch down badly when other processes share the cores
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/bench_throughput.json")
    p.add_argument("--models", default=",".join(MODELS), help="in-process models (comma-separated; '' for none)")
    p.add_argument("--whole", action=argparse.BooleanOptionalAction, default=True, help="the whole-process part")
    p.add_argument("--kernels", default="", help="models whose per-layer conv kernels to time (comma-separated)")
    p.add_argument("--n", type=int, default=297, help="images trained on and featurized (whole process; at most 297"
                   " held-out digits exist)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs (whole process)")
    p.add_argument("--reps", type=int, default=3, help="alternating rounds")
    p.add_argument("--baseline-src", default=None, help="a checkout of the earlier code, for the 'before' rows")
    p.add_argument("--quick", action="store_true", help="a smoke run: small N, 1 round, the small models")
    args = p.parse_args()
    if args.quick:
        args.n, args.epochs, args.reps, args.models = 48, 1, 1, "demo-8x8,default-28x28"
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    report: dict = {"machine": {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                                "load_at_start": load()}, "quick": args.quick, "k": K, "in_process": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in filter(None, args.models.split(",")):
        report["in_process"][name] = in_process(MODELS[name], args.reps, log)
        out.write_text(json.dumps(report, indent=1))  # each part kept as soon as it is measured
    for name in filter(None, args.kernels.split(",")):
        report.setdefault("kernels", {})[name] = kernels(MODELS[name], args.reps, log)
        out.write_text(json.dumps(report, indent=1))
    if args.whole:
        report["whole_process_28x28"] = whole_process(args.n, args.epochs, args.reps, args.baseline_src, log)
    report["machine"]["load_at_end"] = load()
    report["seconds"] = time.perf_counter() - start
    print(f"\n{'model':<14} {'variant':<42} {'per s':>8} {'x plain':>8}")
    for name, res in report["in_process"].items():
        for variant, r in res["rows"].items():
            print(f"{name:<14} {variant:<42} {r['per_s']:8.1f} {r['x_plain']:8.2f}")
        print(f"{name:<14} {'auto (factorized) / sjlt':<42} {res['auto_over_sjlt']:8.2f}")
    for name, res in report.get("kernels", {}).items():
        print(f"\n{name}: per-sample conv weight gradients, ms per batch of {res['batch']}, all conv layers")
        for kname, ms in res["total_ms"].items():
            print(f"  {kname:<26} {ms:8.1f}")
    if "whole_process_28x28" in report:
        w = report["whole_process_28x28"]
        print(f"\nwhole process, 28x28x1, N = {w['n_featurized']}: median samples/s (x train)")
        for variant, v in w["median_samples_per_s"].items():
            ratio = w["ratios_vs_train"].get(variant)
            print(f"  {variant:<30} {v:8.1f}" + (f"  {ratio:5.2f}x" if ratio else ""))
        print(f"  auto / sjlt {w['ratios_vs_train']['auto / sjlt']:.2f}")
    print(f"load average: start {report['machine']['load_at_start']}, end {report['machine']['load_at_end']}")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
