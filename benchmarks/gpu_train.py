"""GPU training throughput: sdstudio's training step against the diffusers-example baseline, in one process.

Per workload (sd15-lora-b16, sd15-full-b16, sdxl-lora-b8, flux-lora) the loops of bench_loops.py are built side
by side in this process: the baseline, sdstudio's eager step and, with ``--compile``, sdstudio with
``train.compile = true`` (its defaults: regional, static shapes, compile cache; flux-lora only when named,
``--compile flux-lora``: a third real-size Flux transformer needs more than an H100's 80 GB). flux-lora runs at
most 3 rounds of 5 steps after 1 warm-up step (``Workload.max_*``): its steps take about a second each.

- Warm-up: each loop's first ``--warmup`` steps, timed on their own (``warmup_s``: compile time included),
  with the torch._dynamo counters (graphs, graph breaks, recompiles) of the compiled loop.
- Steady state: ``--rounds`` rounds of ``--steps`` steps, the loops interleaved in every round (A/B/C, A/B/C,
  ...), each round timed with CUDA events (the host clock on a CPU); the ratio is the median of the per-round
  ratios of img/s, with its min and max. Peak memory per loop: its resident bytes (weights, optimizer state)
  plus the peak above the allocation at the start of its rounds.
- Training happens: the last loss of each loop (``loss``, finite) and whether its trainable weights moved
  (``trainable_changed``: a checksum before the warm-up against one after the rounds).
- The attention kernel per shape of each loop (one profiled step), FLOPs of one step (FlopCounterMode), MFU.
- ``--e2e``: one ``train()`` through the real data path (images on disk, latent + text caches, the loader).
- Compile warm-up with a warm cache: a second process re-runs only the compiled warm-up of the first compiled
  workload against the cache the first process filled (``warmup_warm_cache_s``).

    python benchmarks/gpu_train.py OUT.json [--tiny] [--only NAMES] [--rounds 5] [--steps 30] [--warmup 3]
                                   [--compile [NAMES]] [--e2e] [--set KEY=VALUE ...] [--peak-tflops T]

``--tiny``: tiny models on the CPU (the test's dry run). JSON schema: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import end_to_end
from bench_loops import GIB, WORKLOADS, Loop, Workload, baseline_loop, sdstudio_loop, tf32

# Dense bf16 tensor-core peaks (vendor datasheets), most specific name first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.0),
                    ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


# -- timing --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def allocated(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def timed_steps(loop: Loop, n: int, device: torch.device) -> float:
    """Seconds for ``n`` steps: CUDA events around them on a GPU (the steps themselves never sync), the host
    clock on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            loop.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    for _ in range(n):
        loop.step()
    return time.perf_counter() - t0


def dynamo_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
            "frames_compiled": int(counters["frames"].get("ok", 0))}


def attention_kernels(loop: Loop) -> dict[str, int]:
    """Which SDPA kernel ran, per input shape (query shape and dtype), in one profiled step: {"kernel q=...": n}."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loop.step()
    found: dict[str, int] = {}
    for e in prof.events():
        name = e.name
        if "attention" not in name or "backward" in name or name == "aten::scaled_dot_product_attention":
            continue
        shapes = e.input_shapes[0] if e.input_shapes else []
        key = f"{name.removeprefix('aten::')} q={list(shapes)}"
        found[key] = found.get(key, 0) + 1
    return found


def count_flops(loop: Loop) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        loop.step()
    return int(counter.get_total_flops())


# -- one workload --------------------------------------------------------------------------------------------
def build_loops(w: Workload, args: argparse.Namespace, device: torch.device) -> dict[str, Loop | dict[str, Any]]:
    """name -> Loop, or {"error": ...} for a loop that could not be built (the others still run)."""
    rounds, steps, warmup = plan(w, args)
    tiny, extra, total = args.tiny, dict(args.set), warmup + rounds * steps + 4
    builders: dict[str, Callable[[], Loop]] = {
        "baseline": lambda: baseline_loop(w, tiny, device),
        "sdstudio": lambda: sdstudio_loop(w, tiny, device, total, False, extra)}
    if w.name in args.compiled:
        builders["sdstudio_compiled"] = lambda: sdstudio_loop(w, tiny, device, total, True, extra)
    loops: dict[str, Loop | dict[str, Any]] = {}
    for name, build in builders.items():
        loops[name] = attempt(lambda build=build, name=name: _build_one(name, build, device), device)
    return loops


def plan(w: Workload, args: argparse.Namespace) -> tuple[int, int, int]:
    """(rounds, steps per round, warm-up steps) of a workload: the arguments, within the workload's caps."""
    def cap(value: int, limit: int) -> int:
        return min(value, limit) if limit else value
    return cap(args.rounds, w.max_rounds), cap(args.steps, w.max_steps), cap(args.warmup, w.max_warmup)


def checksum(params: list[torch.nn.Parameter]) -> float:
    """A fingerprint of the trainable weights (no copy kept: a real-size LoRA's copy would count in the peak)."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in params))


def _build_one(name: str, build: Callable[[], Loop], device: torch.device) -> Loop:
    before = allocated(device)
    t0 = time.perf_counter()
    with tf32(name == "baseline"):  # sdstudio sets TF32 itself on a GPU (session.py); the baseline's recipe does
        loop = build()
    sync(device)
    loop.info = {**(loop.info or {}), "build_s": time.perf_counter() - t0,
                 "resident_gib": (allocated(device) - before) if before is not None else None}
    return loop


def run_workload(w: Workload, args: argparse.Namespace, device: torch.device, peak: float | None) -> dict[str, Any]:
    rounds, steps, warmup = plan(w, args)
    entry: dict[str, Any] = {"name": w.name, "family": w.family, "mode": "lora" if w.lora else "full",
                             "batch": w.tiny_batch if args.tiny else w.batch,
                             "resolution": 64 if args.tiny else w.resolution, "rounds": rounds, "steps": steps,
                             "warmup": warmup, "gradient_checkpointing": w.checkpointing}
    if w.missing:
        entry["skipped"] = w.missing
        return entry
    loops = build_loops(w, args, device)
    live = {n: lp for n, lp in loops.items() if isinstance(lp, Loop)}
    results: dict[str, dict[str, Any]] = {n: dict(lp) for n, lp in loops.items() if not isinstance(lp, Loop)}
    try:
        sums = {name: checksum(loop.trainable) for name, loop in live.items()}
        for name, loop in live.items():  # warm-up, one loop after the other: compile time lands here
            before = dynamo_counters()
            t0 = time.perf_counter()
            for _ in range(warmup):
                loop.step()
            sync(device)
            after = dynamo_counters()
            results[name] = {**(loop.info or {}), "warmup_s": time.perf_counter() - t0,
                             "dynamo": {k: after[k] - before[k] for k in after}, "round_s": []}
        peaks = {name: 0.0 for name in live}
        for _ in range(rounds):  # interleaved: A/B/C, A/B/C, ...
            for name, loop in live.items():
                start = allocated(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                results[name]["round_s"].append(timed_steps(loop, steps, device))
                if start is not None:
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / GIB - start)
        for name, loop in live.items():
            r = results[name]
            per_step = statistics.median(r["round_s"]) / steps
            r.update(step_s=per_step, img_per_s=loop.batch / per_step, batch=loop.batch,
                     trainable_m=sum(p.numel() for p in loop.trainable) / 1e6,
                     loss=attend(lambda loop=loop: float(loop.step())),  # one more step, its loss
                     trainable_changed=checksum(loop.trainable) != sums[name])
            if device.type == "cuda":
                r["peak_gib"] = (r.get("resident_gib") or 0.0) + peaks[name]
            r["attention_kernels"] = attend(lambda loop=loop: attention_kernels(loop))
            if name != "sdstudio_compiled":
                r["flops_per_step"] = attend(lambda loop=loop: count_flops(loop))
        flops = next((results[n].get("flops_per_step") for n in ("sdstudio", "baseline")
                      if isinstance(results.get(n, {}).get("flops_per_step"), int)), None)
        for r in results.values():
            if "step_s" in r and flops:
                r["tflops_per_s"] = flops / r["step_s"] / 1e12
                r["mfu"] = r["tflops_per_s"] / peak if peak else None
        if "sdstudio_compiled" in results and "step_s" in results["sdstudio_compiled"]:
            results["sdstudio_compiled"]["time_to_max_steps_s"] = (
                results["sdstudio_compiled"]["warmup_s"] + results["sdstudio_compiled"]["step_s"] * args.max_steps)
    finally:
        for loop in live.values():
            loop.close()
        live.clear()
        free(device)
    entry["loops"] = results
    summarise(entry, args)
    return entry


def summarise(entry: dict[str, Any], args: argparse.Namespace) -> None:
    """The headline fields: ``ratio`` etc. of sdstudio's default-path loop (compiled when measured, else eager)."""
    loops = entry["loops"]
    base = loops.get("baseline", {})
    for key, suffix in (("sdstudio", "_eager"), ("sdstudio_compiled", "_compiled")):
        ours = loops.get(key, {})
        if "round_s" in ours and "round_s" in base and ours["round_s"] and base["round_s"]:
            # img/s ratio of each round (the same batch on both sides when run as intended)
            ratios = sorted((ours["batch"] / o) / (base["batch"] / b)
                            for o, b in zip(ours["round_s"], base["round_s"], strict=True))
            entry["ratio" + suffix] = statistics.median(ratios)
            entry["ratio" + suffix + "_min"], entry["ratio" + suffix + "_max"] = ratios[0], ratios[-1]
    primary = "sdstudio_compiled" if "ratio_compiled" in entry else "sdstudio"
    tag = "_compiled" if primary == "sdstudio_compiled" else "_eager"
    ours = loops.get(primary, {})
    entry.update(variant=primary, ratio=entry.get("ratio" + tag), ratio_min=entry.get("ratio" + tag + "_min"),
                 ratio_max=entry.get("ratio" + tag + "_max"), img_s=ours.get("img_per_s"),
                 baseline_img_s=base.get("img_per_s"), peak_gb=_gb(ours.get("peak_gib")),
                 baseline_peak_gb=_gb(base.get("peak_gib")), warmup_s=ours.get("warmup_s"),
                 baseline_warmup_s=base.get("warmup_s"), time_to_max_steps_s=ours.get("time_to_max_steps_s"))


def _gb(gib: float | None) -> float | None:
    return gib * GIB / 1e9 if gib is not None else None


def attempt(fn: Callable[[], Any], device: torch.device) -> Any:
    """fn(), or {"error": ...} (an out-of-memory included) so that the other loops still run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON; one failing loop must not stop the rest
        error = {"error": f"{type(exc).__name__}: {str(exc)[:800]}",
                 "traceback": traceback.format_exc(limit=8)[-4000:]}
    traceback.print_exc()
    free(device)  # after the except block, so the traceback's frames no longer hold tensors
    return error


def attend(fn: Callable[[], Any]) -> Any:
    """A secondary figure: its value, or its error as a string (never fatal)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a profiler / flop-counter failure loses one figure only
        return f"error: {type(exc).__name__}: {str(exc)[:300]}"


# -- a second process: compile warm-up against the cache the first one filled --------------------------------
def warm_cache_probe(args: argparse.Namespace, name: str) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="sdstudio-warm-")) / "warm.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(out), "--only", name, "--compile", name,
           "--rounds", "1", "--steps", "1", "--warmup", str(args.warmup), "--no-warm-probe", "--no-e2e",
           *(["--tiny"] if args.tiny else []), *[f"--set={k}={json.dumps(v)}" for k, v in args.set]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.probe_timeout, check=False, env=os.environ)
    result: dict[str, Any] = {"process_s": time.perf_counter() - t0, "returncode": proc.returncode}
    try:
        entry = json.loads(out.read_text(encoding="utf-8"))["workloads"][0]
        result["warmup_s"] = entry["loops"]["sdstudio_compiled"]["warmup_s"]
        result["dynamo"] = entry["loops"]["sdstudio_compiled"].get("dynamo")
    except (OSError, KeyError, IndexError, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}; {proc.stderr[-1500:]}"
    return result


# -- reporting -----------------------------------------------------------------------------------------------
def peak_bf16_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no GPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"datasheet dense bf16 for {key}"
    return None, f"unknown card {name!r}: pass --peak-tflops"


def print_entry(e: dict[str, Any]) -> None:
    if "skipped" in e:
        print(f"\n== {e['name']}: not measured ({e['skipped']})", flush=True)
        return
    print(f"\n== {e['name']}: {e['mode']}, batch {e['batch']}, {e['resolution']} px", flush=True)
    for name, r in e["loops"].items():
        if "error" in r:
            print(f"  {name:18s} FAILED {r['error'].splitlines()[0][:160]}", flush=True)
            continue
        mem = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
        print(f"  {name:18s} {r['img_per_s']:.2f} img/s ({r['step_s'] * 1000:.1f} ms/step{mem}), warm-up "
              f"{r['warmup_s']:.1f} s", flush=True)
    for tag in ("_eager", "_compiled"):
        if e.get("ratio" + tag) is not None:
            print(f"  sdstudio{tag}: {e['ratio' + tag]:.2f}x the baseline (rounds {e['ratio' + tag + '_min']:.2f}"
                  f"-{e['ratio' + tag + '_max']:.2f})", flush=True)


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    import sdstudio

    out: dict[str, str | None] = {"torch": torch.__version__, "sdstudio": sdstudio.__version__,
                                  "python": sys.version.split()[0], "cuda": torch.version.cuda}
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON file to write (rewritten after every workload)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (for tests)")
    parser.add_argument("--only", default="", help=f"comma-separated workloads out of {', '.join(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5; 2 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="steps per loop per round (30 on a GPU, 2 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (3 on a GPU, 1 tiny)")
    parser.add_argument("--max-steps", type=int, default=1500, help="for time_to_max_steps_s (the presets' 1500)")
    parser.add_argument("--compile", nargs="?", const="all", default="",
                        help="also measure sdstudio with train.compile for these workloads (default: all but "
                             "flux-lora, which must be named)")
    parser.add_argument("--e2e", dest="e2e", action="store_true", default=None, help="one train() run (default on)")
    parser.add_argument("--no-e2e", dest="e2e", action="store_false")
    parser.add_argument("--no-warm-probe", dest="warm_probe", action="store_false",
                        help="skip the second process measuring compile warm-up with a warm cache")
    parser.add_argument("--probe-timeout", type=int, default=240)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_override,
                        help="a config override for the sdstudio side, e.g. train.gradient_checkpointing=true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak for MFU")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [n for n, w in WORKLOADS.items() if w.default]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    args.names = names
    compiled = [n.strip() for n in args.compile.split(",") if n.strip()]
    args.compiled = {n for n in names if WORKLOADS[n].compile_default} if compiled == ["all"] else set(compiled)
    args.rounds = args.rounds or (2 if args.tiny else 5)
    args.steps = args.steps or (2 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.e2e = (not args.only) if args.e2e is None else args.e2e
    return args


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    peak, peak_source = peak_bf16_tflops(device, args.peak_tflops)
    import logging

    from diffusers.utils import logging as diffusers_logging

    logging.basicConfig(level=logging.WARNING)  # sdstudio's own info lines would drown the figures
    diffusers_logging.set_verbosity_error()
    # a cold compile cache of this run's own (the warm probe reuses it); TORCHINDUCTOR_CACHE_DIR set outside wins
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="sdstudio-inductor-"))
    vers = versions()
    results: dict[str, Any] = {
        "schema": "sdstudio-gpu-train/2", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "versions": vers,
        "peak_bf16_tflops": peak, "peak_source": peak_source, "tiny": args.tiny, "rounds": args.rounds,
        "steps": args.steps, "warmup": args.warmup, "argv": sys.argv[1:], "timer": "cuda-events"
        if device.type == "cuda" else "host", "compile_cache_dir": os.environ["TORCHINDUCTOR_CACHE_DIR"],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workloads": []}
    if device.type == "cpu":
        results["cpu_threads"] = torch.get_num_threads()
    print(f"device {results['device']}, peak {peak} TFLOP/s ({peak_source}), {vers}", flush=True)
    torch.manual_seed(0)
    failed = False
    for name in args.names:
        t0 = time.perf_counter()
        entry = run_workload(WORKLOADS[name], args, device, peak)
        entry["wall_s"] = time.perf_counter() - t0
        failed |= any("error" in r for r in entry.get("loops", {}).values())
        results["workloads"].append(entry)
        write_json(args.out, results)
        print_entry(entry)
    compiled = [e["name"] for e in results["workloads"] if "sdstudio_compiled" in e.get("loops", {})]
    if compiled and args.warm_probe:
        probe = warm_cache_probe(args, compiled[0])
        entry = next(e for e in results["workloads"] if e["name"] == compiled[0])
        entry["warm_cache_probe"] = probe
        entry["warmup_warm_cache_s"] = probe.get("warmup_s")
        print(f"\ncompile warm-up of {compiled[0]} with a warm cache (second process): {probe.get('warmup_s')}",
              flush=True)
        write_json(args.out, results)
    if args.e2e:
        results["end_to_end"] = attempt(lambda: end_to_end(args, device), device)
        failed |= "error" in results["end_to_end"]
        print(f"\nend-to-end train(): {json.dumps(results['end_to_end'])[:600]}", flush=True)
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(args.out, results)
    print(f"\nwrote {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "--tiny" in sys.argv and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a smoke test: two threads on a shared 2-core machine can run 10-50x slower
    sys.exit(main())
