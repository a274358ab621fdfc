"""The prepared GPU check (issue 9, item 4): CUDA golden tests, a faiss-gpu index, featurize throughput on a
diffusers UNet2DModel of the DDPM-CIFAR10 size against plain forward + backward. One command, a few minutes:

    bash benchmarks/gpu_check.sh            # on the GPU machine; $OUT (if set) receives gpu_check.json
    python benchmarks/gpu_check.py --device cpu --quick   # the dry run of its logic on a CPU machine

Every part reports what it could not do (no CUDA, faiss missing or CPU-only, diffusers missing) instead of
failing the whole check. Throughput rows are medians over alternating rounds, each call synchronized.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from projidx.features.factorized import FactorizedGradients  # noqa: E402
from projidx.features.grads import GradientComputer, parameter_shapes  # noqa: E402
from projidx.features.projection import ProjectorSpec, make_projector  # noqa: E402
from projidx.models.diffusion import DiffusersEps, NoiseSchedule, diffusion_loss  # noqa: E402

# google/ddpm-cifar10-32's UNet2DModel: 35.7M parameters at 32x32x3
CIFAR10_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
QUICK_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=8)


def golden_tests(device: str, timeout: int) -> dict:
    """tests/test_projectors_gpu.py (they skip without CUDA): CPU and GPU agree for every projector kind."""
    if device != "cuda":
        return {"skipped": "not on a CUDA device"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_projectors_gpu.py"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"passed": False, "summary": f"timed out after {timeout} s"}
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {"passed": proc.returncode == 0, "summary": lines[-1] if lines else "", "tail": lines[-15:]}


def faiss_check(device: str, n: int, d: int, queries: int) -> dict:
    """A FAISS Flat and IVF-SQfp16 inner-product index on unit vectors, moved to the GPU as projidx.search.index does,
    against the exact top-10 from a torch matmul."""
    try:
        import faiss
    except ImportError as e:
        return {"skipped": f"faiss does not import ({e}); pip install faiss-gpu (the [gpu] extra)"}
    gpus = faiss.get_num_gpus()
    out: dict = {"faiss": getattr(faiss, "__version__", "?"), "gpus": gpus}
    if device == "cuda" and gpus == 0:
        out["note"] = "faiss-gpu missing: this faiss is CPU-only (get_num_gpus() == 0); indices ran on the CPU"
    gen = torch.Generator().manual_seed(0)
    xb = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    xq = torch.nn.functional.normalize(xb[:queries] + 0.3 * torch.randn(queries, d, generator=gen), dim=1)
    exact = (xq.to(device) @ xb.to(device).T).topk(10, dim=1).indices.cpu().numpy()
    nlist = max(16, int(4 * n ** 0.5))
    for factory in ("Flat", f"IVF{nlist},SQfp16"):
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        start = time.perf_counter()
        index.train(xb.numpy())
        index.add(xb.numpy())
        build = time.perf_counter() - start
        if gpus > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        if "IVF" in factory:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", 64)
        index.search(xq.numpy()[:8], 10)
        start = time.perf_counter()
        _, ids = index.search(xq.numpy(), 10)
        search = time.perf_counter() - start
        recall = float(sum(len(set(a) & set(b)) for a, b in zip(ids, exact, strict=True)) / exact.size)
        out[factory] = {"on_gpu": gpus > 0, "build_s": build, "ms_per_query": 1000 * search / queries,
                        "recall_at_10": recall}
    return out


def timed_rounds(fns: dict[str, Callable[[], object]], reps: int, per: int, device: str) -> dict[str, float]:
    """Median seconds per gradient of each fn (``per`` gradients a call), rounds alternating, synchronized."""
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) / per)
    return {name: statistics.median(v) for name, v in times.items()}


def throughput(device: str, quick: bool, batch: int, reps: int, k: int) -> dict:
    """Featurize (gradients + projection + exact norms, one batch) vs plain batched forward + backward."""
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        return {"skipped": f"diffusers does not import ({e})"}
    torch.manual_seed(0)
    config = QUICK_UNET if quick else CIFAR10_UNET
    model = DiffusersEps(UNet2DModel(**config)).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    shape = (3, config["sample_size"], config["sample_size"])
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, *shape, generator=gen) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=gen)
    eps = torch.randn(batch, 1, *shape, generator=gen)
    hooks = FactorizedGradients(model, schedule, "mse", device)
    vmap = GradientComputer(model, schedule, "mse", device)
    shapes = parameter_shapes(model)
    sjlt = make_projector(ProjectorSpec("sjlt", k, shapes), device)
    fact = make_projector(ProjectorSpec("factorized", k, shapes), device)
    xd, td, ed = x0.to(device), t.to(device), eps.to(device)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        diffusion_loss(model, xd, td, ed[:, 0], vmap.abar, "mse").sum().backward()

    fns = {"plain fwd+bwd": plain,
           "featurize sjlt (hooks, the default source)": lambda: hooks.project(sjlt, x0, t, eps),
           "featurize factorized (auto)": lambda: hooks.project(fact, x0, t, eps),
           "featurize sjlt (vmap)": lambda: vmap.project(sjlt, x0, t, eps)}
    # the golden check of the sources on this device: hooks and vmap give the same projection and norms
    agree = [torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(
        hooks.project(sjlt, x0, t, eps), vmap.project(sjlt, x0, t, eps), strict=True)]
    seconds = timed_rounds(fns, reps, batch, device)
    plain_s = seconds["plain fwd+bwd"]
    rows = {name: {"per_s": 1 / s, "x_plain": plain_s / s} for name, s in seconds.items()}
    return {"model": "diffusers UNet2DModel " + ("(quick)" if quick else "(DDPM-CIFAR10 config)"), "params": params,
            "image_shape": list(shape), "batch": batch, "k": k, "rows": rows, "hooks_equal_vmap": all(agree)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (the CPU dry run)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench-out"), "gpu_check.json"))
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    start = time.perf_counter()
    report: dict = {"device": args.device, "quick": args.quick, "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    steps = [("golden_tests", lambda: golden_tests(args.device, 120)),
             ("faiss", lambda: faiss_check(args.device, 20_000 if args.quick else 200_000, 128 if args.quick else 512,
                                           64 if args.quick else 1024)),
             ("throughput", lambda: throughput(args.device, args.quick, 8 if args.quick else 64,
                                               2 if args.quick else 5, 512 if args.quick else 2048))]
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            report[name] = step()
        except Exception as e:  # noqa: BLE001 - one failing part must not hide the others' results
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        report[name]["seconds"] = time.perf_counter() - t0
        print(f"[{time.perf_counter() - start:5.0f}s] {name}: {json.dumps(report[name])[:400]}", flush=True)
    report["seconds"] = time.perf_counter() - start
    tp = report["throughput"]
    if "rows" in tp:
        print(f"\n{tp['model']}, {tp['params'] / 1e6:.1f}M parameters, {tp['image_shape']}, batch {tp['batch']},"
              f" k = {tp['k']}, on {args.device}; hooks == vmap: {tp['hooks_equal_vmap']}")
        print(f"{'':<44} {'per s':>9} {'x plain':>8}")
        for name, r in tp["rows"].items():
            print(f"{name:<44} {r['per_s']:9.1f} {r['x_plain']:8.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
