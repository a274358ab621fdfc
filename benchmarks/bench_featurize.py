"""Featurization speed on CPU: gradients vs projection, every projector kind, TRAK's and dattri's CPU projectors.

Measured side by side in one run, per model (the demo UNet and a >= 10M-parameter UNet at 8x8x1 and
32x32x3), with B samples per batch and one noise draw each:
- plain batched forward + backward of the summed loss (samples/s): the cost of training;
- per-sample gradients without projection (torch.func vmap), and the factorized path's per-sample layer
  factors without projection (one batched forward + backward to the layer outputs);
- full featurization with each projector kind at each k: gradients + projection with exact norms, as
  projidx.features.featurization does them (the dense kind projects ``projection_rows`` gradients per call, as the
  featurizer batches it), with projection's share of the time;
- traker's and dattri's CPU ``BasicProjector`` (Rademacher) projecting the same gradients, one call per
  batch, when those optional packages import (reported as unavailable otherwise);
- peak RSS of the process; peak RSS of ``projidx featurize`` (a subprocess) at N = 1,000 vs 10,000;
- fidelity per kind at k=2048 (benchmarks/fidelity.py's ``run``).
Combinations whose cost would blow the time budget (p * k random numbers for dense/TRAK/dattri on the
10M models at large k) are reported as skipped, with the reason, never estimated as a measurement.

Run (from the repository root): .venv/bin/python benchmarks/bench_featurize.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from projidx.features.factorized import FactorizedGradients, project_capture
from projidx.features.featurization import FeaturizeConfig, projection_rows, resolve_projector
from projidx.features.grads import GradientComputer, parameter_shapes
from projidx.features.projection import ProjectorSpec, make_projector
from projidx.models.diffusion import NoiseSchedule, diffusion_loss
from projidx.models.unet import SmallUNet, UNetConfig

KINDS = ("sjlt", "srht", "dense", "factorized")
RANDOM_MATRIX_LIMIT = 2.2e10  # p * k random entries per call above which dense / TRAK / dattri are skipped


@dataclass(frozen=True)
class Case:
    name: str
    unet: UNetConfig
    shape: tuple[int, int, int]
    batch: int
    ks: tuple[int, ...]
    baseline_ks: tuple[int, ...]  # k at which dense, TRAK and dattri run
    reps: int


def cases(quick: bool) -> list[Case]:
    large = UNetConfig(base=136, mults=(1, 2, 2))
    if quick:
        return [Case("demo", UNetConfig(base=32), (1, 8, 8), 16, (512, 2048), (2048,), 3),
                Case("large-8x8", large, (1, 8, 8), 8, (512,), (), 1)]
    return [
        Case("demo", UNetConfig(base=32), (1, 8, 8), 16, (512, 2048, 8192), (512, 2048, 8192), 5),
        Case("large-8x8", large, (1, 8, 8), 16, (512, 2048, 8192), (512, 2048), 1),
        Case("large-32x32", UNetConfig(channels=3, base=136, mults=(1, 2, 2)), (3, 32, 32), 8, (512, 2048, 8192),
             (512,), 1),
    ]


def timed(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn`` over ``reps`` calls after ``warmup`` calls (oneDNN compiles kernels)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline_projectors() -> dict[str, Callable[[int, int], Callable[[torch.Tensor], torch.Tensor]] | str]:
    """{name: factory(p, k) -> project(flat (B, p)) or the reason it is unavailable}."""
    out: dict = {}
    try:
        from trak.projectors import BasicProjector, ProjectionType

        def trak_factory(p: int, k: int):
            proj = BasicProjector(grad_dim=p, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                                  device=torch.device("cpu"))
            return lambda flat: proj.project(flat, model_id=0)

        out["traker"] = trak_factory
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        out["traker"] = f"unavailable ({type(e).__name__}: {e}); pip install traker"
    try:
        from dattri.func.projection import BasicProjector as DBasic
        from dattri.func.projection import ProjectionType as DType

        def dattri_factory(p: int, k: int):
            proj = DBasic(feature_dim=p, proj_dim=k, seed=0, proj_type=DType.rademacher, device=torch.device("cpu"))
            return lambda flat: proj.project(flat, ensemble_id=0)

        out["dattri"] = dattri_factory
    except Exception as e:  # noqa: BLE001
        out["dattri"] = f"unavailable ({type(e).__name__}: {e}); pip install dattri"
    return out


def bench_case(case: Case, log: Callable[[str], None]) -> dict:
    """All measurements of one model; seconds are per sample (per gradient)."""
    torch.manual_seed(0)
    model = SmallUNet(case.unet).eval()
    p = sum(v.numel() for v in model.parameters())
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(0)
    b = case.batch
    x0 = torch.rand(b, *case.shape, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (b,), generator=gen)
    eps = torch.randn(b, 1, *case.shape, generator=gen)
    computer = GradientComputer(model, schedule, "mse")
    factors = FactorizedGradients(model, schedule, "mse")
    res: dict = {"params": p, "image_shape": list(case.shape), "batch": b, "reps": case.reps, "rows": []}

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        diffusion_loss(model, x0, t, eps[:, 0], computer.abar, "mse").sum().backward()

    res["plain_fwd_bwd_s"] = timed(plain, case.reps) / b
    res["per_sample_grads_s"] = timed(lambda: computer.per_sample(x0, t, eps), case.reps) / b
    res["factor_capture_s"] = timed(lambda: factors.capture(x0, t, eps), case.reps) / b
    log(f"{case.name}: p={p:,} plain {1 / res['plain_fwd_bwd_s']:.1f}/s, per-sample grads "
        f"{1 / res['per_sample_grads_s']:.1f}/s, factors {1 / res['factor_capture_s']:.1f}/s")
    grads = computer.per_sample(x0, t, eps)
    shapes = parameter_shapes(model)
    for k in case.ks:
        for kind in KINDS:
            res["rows"].append(bench_kind(kind, k, case, shapes, grads, factors, (x0, t, eps), res, log))
    flat = torch.cat([grads[n].reshape(b, -1) for n in sorted(grads)], dim=1)
    del grads
    for name, factory in baseline_projectors().items():
        for k in case.ks:
            res["rows"].append(bench_baseline(name, factory, k, case, flat, res, log))
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def skip_reason(p: int, k: int) -> str:
    return f"not run: p*k = {p * k:.2g} random entries per call (time budget of this run)"


def bench_kind(kind, k, case, shapes, grads, factors, batch, res, log) -> dict:
    """One projector kind at one k: projection seconds per gradient and featurization throughput."""
    p = res["params"]
    if kind == "dense" and (k not in case.baseline_ks or p * k > RANDOM_MATRIX_LIMIT):
        return {"projector": kind, "k": k, "skipped": skip_reason(p, k)}
    projector = make_projector(ProjectorSpec(kind, k, shapes), "cpu")
    b = case.batch
    if kind == "factorized":
        total = timed(lambda: project_capture(projector, factors.capture(*batch), factors.names), case.reps) / b
        grad_s = res["factor_capture_s"]
        proj_s = max(total - grad_s, 0.0)
    else:
        rows = projection_rows(projector, b, 1)
        tiled = grads if rows == b else {n: g.repeat((-(-rows // b),) + (1,) * (g.dim() - 1))[:rows]
                                         for n, g in grads.items()}
        reps = 1 if kind == "dense" else case.reps
        proj_s = timed(lambda: projector.project_with_norms(tiled), reps, warmup=1) / rows
        grad_s = res["per_sample_grads_s"]
        total = grad_s + proj_s
    row = {"projector": kind, "k": k, "projection_s": proj_s, "featurize_s": total,
           "featurize_per_s": 1 / total, "projection_share": proj_s / total,
           "vs_plain": res["plain_fwd_bwd_s"] / total}
    log(f"  {kind:>10} k={k:<5} featurize {1 / total:8.1f}/s  projection {1000 * proj_s:8.2f} ms/grad"
        f" ({100 * proj_s / total:4.1f}%)  {row['vs_plain']:.2f}x plain")
    return row


def bench_baseline(name, factory, k, case, flat, res, log) -> dict:
    """TRAK's / dattri's CPU projector on the same gradients, one call per batch."""
    p = res["params"]
    if isinstance(factory, str):
        return {"projector": name, "k": k, "skipped": factory}
    if k not in case.baseline_ks or p * k > RANDOM_MATRIX_LIMIT:
        return {"projector": name, "k": k, "skipped": skip_reason(p, k)}
    project = factory(p, k)
    proj_s = timed(lambda: project(flat), 1, warmup=0) / flat.shape[0]
    total = res["per_sample_grads_s"] + proj_s
    row = {"projector": name, "k": k, "projection_s": proj_s, "featurize_s": total, "featurize_per_s": 1 / total,
           "projection_share": proj_s / total, "vs_plain": res["plain_fwd_bwd_s"] / total}
    log(f"  {name:>10} k={k:<5} featurize {1 / total:8.3f}/s  projection {1000 * proj_s:8.1f} ms/grad"
        f" ({100 * proj_s / total:4.1f}%)")
    return row


def tiled_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 8, 8) uint8 digits: scikit-learn's digits tiled and perturbed by +-1 grey level; ids 0..n-1."""
    from sklearn.datasets import load_digits

    base = (load_digits().images * (255 / 16)).astype(np.int16)
    rng = np.random.default_rng(seed)
    images = base[np.arange(n) % len(base)] + rng.integers(-1, 2, (n, 8, 8))
    return np.clip(images, 0, 255).astype(np.uint8), np.arange(n, dtype=np.int64)


def child_peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """Run ``python -m projidx.cli.main ARGS`` and return its own peak RSS (MB) and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "projidx.cli.main", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"projidx {' '.join(args)} failed: {err[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def bench_rss(sizes: tuple[int, int], log: Callable[[str], None]) -> dict:
    """Peak RSS of ``projidx featurize`` (default projector, 1 checkpoint, replay) at two dataset sizes."""
    out: dict = {"projector": resolve_projector(FeaturizeConfig().projector, SmallUNet(UNetConfig())), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        images, ids = tiled_digits(max(sizes))
        np.savez(tmp_path / "big.npz", images=images, ids=ids)
        subprocess.run([sys.executable, "-m", "projidx.cli.main", "train", "--data", str(tmp_path / "big.npz"), "--out",
                        str(tmp_path / "ck"), "--epochs", "1", "--checkpoints", "1"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n in sizes:
            data = tmp_path / f"n{n}.npz"
            np.savez(data, images=images[:n], ids=ids[:n])
            rss, wall = child_peak_rss_mb(["featurize", "--checkpoints", str(tmp_path / "ck"), "--data", str(data),
                                           "--store", str(tmp_path / f"s{n}.zarr"), "--projector", out["projector"]])
            out["sizes"][str(n)] = {"peak_rss_mb": rss, "seconds": wall, "samples_per_s": n / wall}
            log(f"projidx featurize N={n}: peak RSS {rss:.0f} MB, {wall:.0f} s")
    small, big = (out["sizes"][str(n)]["peak_rss_mb"] for n in sizes)
    out["ratio"] = big / small
    return out


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_at_start": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def summary(models: dict, rss: dict, fidelity: list[dict] | None) -> dict:
    """The issue's targets, from the measurements (reported whether met or not)."""
    demo = models["demo"]
    rows = {(r["projector"], r["k"]): r for r in demo["rows"] if "skipped" not in r}
    default = resolve_projector(FeaturizeConfig().projector, SmallUNet(UNetConfig()))
    out: dict = {"default_projector": default}
    if (default, 2048) in rows:
        out["demo_k2048_default_projection_share"] = rows[(default, 2048)]["projection_share"]
        for base in ("traker", "dattri"):
            if (base, 2048) in rows:
                out[f"demo_k2048_default_vs_{base}"] = (rows[(default, 2048)]["featurize_per_s"]
                                                      / rows[(base, 2048)]["featurize_per_s"])
    out["factorized_vs_plain"] = {name: {str(r["k"]): r["vs_plain"] for r in m["rows"]
                                         if r["projector"] == "factorized" and "skipped" not in r}
                                  for name, m in models.items()}
    out["featurize_rss_ratio"] = rss["ratio"]
    if fidelity:
        out["fidelity_k2048_spearman"] = {f"{r['kind']}/{r['method']}": r["spearman"] for r in fidelity
                                          if "spearman" in r}
    return out


def print_table(models: dict) -> None:
    print(f"\n{'model':<12} {'projector':<10} {'k':>5} {'featurize/s':>12} {'proj ms/grad':>13} {'proj %':>7}"
          f" {'x plain':>8}")
    for name, m in models.items():
        print(f"{name:<12} {'plain f+b':<10} {'':>5} {1 / m['plain_fwd_bwd_s']:12.1f}")
        print(f"{name:<12} {'grads only':<10} {'':>5} {1 / m['per_sample_grads_s']:12.1f}")
        print(f"{name:<12} {'factors':<10} {'':>5} {1 / m['factor_capture_s']:12.1f}")
        for r in m["rows"]:
            if "skipped" in r:
                print(f"{name:<12} {r['projector']:<10} {r['k']:>5} skipped: {r['skipped']}")
            else:
                print(f"{name:<12} {r['projector']:<10} {r['k']:>5} {r['featurize_per_s']:12.2f}"
                      f" {1000 * r['projection_s']:13.2f} {100 * r['projection_share']:6.1f}% {r['vs_plain']:8.2f}")


def main() -> None:
    if os.environ.get("OMP_WAIT_POLICY") is None:
        # OpenMP threads that spin while waiting slow torch down ~100x when other processes share the cores
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (a few minutes)")
    parser.add_argument("--out", default="benchmarks/results/bench_featurize.json", help="JSON results file")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--skip-fidelity", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    report: dict = {"machine": machine(), "quick": args.quick, "models": {}}
    for case in cases(args.quick):
        report["models"][case.name] = bench_case(case, log)
    report["featurize_rss"] = bench_rss((200, 2000) if args.quick else (1000, 10000), log)
    fidelity = None
    if not args.skip_fidelity:
        sys.path.insert(0, str(Path(__file__).parent))
        import fidelity as fidelity_bench

        kinds = list(KINDS)
        n_train, n_queries = (100, 4) if args.quick else (300, 8)
        with tempfile.TemporaryDirectory() as tmp:
            fidelity = fidelity_bench.run(kinds, [2048], n_train, n_queries, 5, 2, None, Path(tmp))
        log("fidelity (mean Spearman vs exact, k=2048): "
            + ", ".join(f"{r['kind']} {r['method']}: {r['spearman']:.3f}" for r in fidelity if "spearman" in r))
    report["fidelity"] = fidelity
    report["summary"] = summary(report["models"], report["featurize_rss"], fidelity)
    report["seconds"] = time.perf_counter() - start
    print_table(report["models"])
    print(json.dumps(report["summary"], indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
