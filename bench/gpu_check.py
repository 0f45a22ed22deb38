"""Everything this project measures on a GPU, in one command, as markdown ready for BENCHMARKS.md.

    make gpu-check                                  # python bench/gpu_check.py --output gpu_check.md
    python bench/gpu_check.py --dry-run             # the same code with tiny shapes on the CPU (a test runs it)

On one CUDA GPU, in about 6 minutes (steps 1-5 took 4 to 5 on an H100), each step timed and allowed
to fail without stopping the others:
  1. the kernel: builds msda_cuda (nvcc, just in time) and gives its self-check error for each dtype;
  2. `pytest -m cuda`: the kernel tests, on the GPU;
  3. the kernel against the reference and its bandwidth floor at DINO-4scale shapes (bench/msda.py);
  4. training steps (bench/train_step.py): Swin-L at 1.5x scale, batch 2 and batch 1, and R50 batch 2,
     peak memory and images/s with each memory option;
  5. R50 800x1333 inference FPS, batch 1: fp32, bf16, and bf16 through inference.compile_model;
  6. where the GPU's detections depart from the CPU's, stage by stage, eager and compiled
     (bench/gpu_agreement.py);
  7. the compiled training step (train.py --compile), bf16, against the eager one: R50 batch 2 and Swin-L
     1.5x batch 2, images/s, peak memory, kernel launches and waits for the device per step;
  8. with --official DIR (a checkout of IDEA-Research/DINO, which the GPU machine must be given, as it
     cannot download: `make gpu-check OFFICIAL=DIR`), our float32 training step against the official code's
     (bench/official_step.py): R50 800x1333 batch 2, Swin-L 1.5x batch 1 and 2.
It needs torch, torchvision, numpy, scipy and ninja (pytest for step 2), never pycocotools. The table is
printed last and written to --output after every step, so a run cut short still leaves what it measured.
"""
import argparse
import datetime
import functools
import platform
import subprocess
import sys
import time
import traceback
import unittest.mock
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import gpu_agreement  # noqa: E402
import msda  # noqa: E402
import msda_cuda  # noqa: E402
import train_step  # noqa: E402
from appendix.inference import output_agreement  # noqa: E402
from appendix.runs import write_atomically  # noqa: E402

TARGETS = {  # issue 14: peak training memory (GiB, bf16 with checkpointing) and inference FPS; issue 26: compiled
    ("swinl", 2): 12, ("swinl", 1): 8, ("r50", 2): 8, "r50 fps bf16": 46,  # training images/s, bf16
    ("compiled", "r50"): 40, ("compiled", "swinl"): 15}
# the shapes of a full run, and of a dry run (a small model, small images, on the CPU)
FULL = dict(training=[("swinl", 1.5, 2), ("swinl", 1.5, 1), ("r50", 1.0, 2)], train_iters=5,
            compiled_training=[("r50", 1.0, 2), ("swinl", 1.5, 2)], compile_backend="inductor",
            official=[("r50", (800, 1333), 2), ("swinl", (1200, 2000), 1), ("swinl", (1200, 2000), 2)], official_pairs=5,
            inference_iters=30, msda_iters=20, msda_levels=msda.LEVELS, decoder_queries=1100, overrides={})
DRY = dict(training=[("r18", 0.06, 2)], train_iters=1, inference_iters=1, msda_iters=1,
           compiled_training=[("r18", 0.06, 2)], compile_backend="aot_eager",  # checks the script, not inductor
           official=[("r50", (200, 333), 1)], official_pairs=1,  # the official code's top-900 needs 900 tokens
           msda_levels=[(6, 10), (3, 5), (2, 3), (1, 2)], decoder_queries=11,
           overrides=dict(hidden_dim=64, nheads=2, enc_layers=1, dec_layers=1, dim_feedforward=64,
                          num_queries=20, dn_number=4))


class Report:
    """The markdown lines so far, rewritten to `path` after each step (atomically: a run cut short mid-write
    leaves the last whole report)."""

    def __init__(self, path: Path):
        self.path, self.lines = path, []

    def add(self, *lines: str):
        self.lines += lines
        write_atomically(self.path, "\n".join(self.lines) + "\n")


def step(report: Report, title: str):
    """Run a step's function, timing it; a failure is reported with its cause and the run goes on."""
    def wrap(fn):
        start = time.perf_counter()
        print(f"--- {title}", flush=True)
        try:
            fn()
            outcome = f"done in {time.perf_counter() - start:.0f} s"
        except Exception as e:  # noqa: BLE001 - every step is reported, whatever breaks
            traceback.print_exc()
            outcome = f"FAILED after {time.perf_counter() - start:.0f} s: {type(e).__name__}: {str(e)[:300]}"
        report.add(f"_{title}: {outcome}_", "")
        print(f"--- {title}: {outcome}", flush=True)
    return wrap


def environment(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return [f"- device: CPU ({platform.processor() or platform.machine()}), dry run: tiny shapes, figures "
                f"mean nothing", f"- torch {torch.__version__}"]
    p = torch.cuda.get_device_properties(device)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        driver = "unknown"
    return [f"- GPU: {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, {p.multi_processor_count} SMs, driver {driver}",
            f"- torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}"]


def kernel_step(report: Report, device: torch.device):
    """Build the kernel (GPU only) and give its self-check error per dtype."""
    if device.type == "cuda":
        start = time.perf_counter()
        if msda_cuda._kernel() is None:
            raise RuntimeError(f"the kernel did not build: {msda_cuda._build_errors.get('CUDA')}")
        report.add(f"Kernel built (or loaded from the cache) in {time.perf_counter() - start:.0f} s.", "")
    lines = ["| dtype | self-check error (max over forward and 3 gradients, relative) | tolerance | verdict |",
             "| --- | --- | --- | --- |"]
    for dtype, tolerance in msda_cuda.SELF_CHECK_TOLERANCE.items():
        if device.type == "cuda":
            error = msda_cuda.self_check_error(msda_cuda._kernel(), device, dtype, 8, 32)
        else:  # no kernel here: the reference against itself, to run the same code
            error = 0.0
        lines.append(f"| {str(dtype)[6:]} | {error:.2e} | {tolerance:.0e} | "
                     f"{'pass' if error <= tolerance else 'FAIL'} |")
    report.add(*lines, "")


def pytest_step(report: Report, timeout: float):
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               "tests/test_msda_cuda.py", "tests/test_compile.py"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-6000:], result.stderr[-3000:], flush=True)
    summary = [line for line in result.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    report.add(f"`pytest -m cuda`: exit code {result.returncode}, {summary[0].strip('= ')}", "")
    if result.returncode != 0:
        failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        report.add(*[f"    {line}" for line in failed[:20]], "")


def msda_step(report: Report, device: torch.device, shapes: dict):
    peak, rows = msda.measure(shapes["msda_iters"], shapes["msda_levels"], shapes["decoder_queries"], device,
                              peak_megabytes=512 if device.type == "cuda" else 16)
    print("\n".join(msda.format_rows(rows)), flush=True)
    lines = [f"Copy bandwidth {peak / 1e12:.2f} TB/s (read + write). Times in ms, medians.", "",
             "| case | impl | forward | x floor | forward + backward | backward x floor | speed-up (f+b) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_ms'] / r['fwd_floor_ms']:.1f} | "
                     f"{r['both_ms']:.3f} | {(r['both_ms'] - r['fwd_ms']) / r['bwd_floor_ms']:.1f} | "
                     f"{r['speedup']:.1f} |")
    report.add(*lines, "")


def training_step(report: Report, device: torch.device, shapes: dict, deadline: float):
    report.add("| model, images, batch | configuration | images/s | peak GiB | target |", "| --- | --- | --- | --- | --- |")
    for backbone, scale, batch_size in shapes["training"]:
        size = (round(800 * scale), round(1333 * scale))
        label = f"{backbone} {size[0]}x{size[1]}, batch {batch_size}"
        target = TARGETS.get((backbone, batch_size))
        for name, options in train_step.CONFIGS:
            if time.perf_counter() > deadline:
                report.add(f"| {label} | {name} | skipped: out of time | | |")
                continue
            try:
                seconds, peak = train_step.time_training(
                    {"backbone": backbone, "scale": scale, **shapes["overrides"], **options}, size, batch_size,
                    shapes["train_iters"], device)
                verdict = ""
                if target is not None and name == "bf16 + all ckpt" and peak is not None:
                    verdict = f"<= {target} GiB: {'met' if peak <= target else 'MISSED'}"
                peak_text = f"{peak:.2f}" if peak is not None else "n/a"
                report.add(f"| {label} | {name} | {batch_size / seconds:.2f} | {peak_text} | {verdict} |")
            except torch.OutOfMemoryError:
                report.add(f"| {label} | {name} | out of memory | | |")
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(report.lines[-1], flush=True)
    report.add("")


def compiled_training_step(report: Report, device: torch.device, shapes: dict, deadline: float):
    """bf16 training steps, eager then compiled (the compiled one on its size bucket: 896x1408 for 800x1333),
    each timed over train_iters steps after its first (which compiles), and what one step asks of the host."""
    report.add("| model, images, batch | step | images/s | first step s | peak GiB | host aten calls | kernel launches | "
               "waits for the device | target |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    compile_with = functools.partial(torch.compile, backend=shapes["compile_backend"])
    for backbone, scale, batch_size in shapes["compiled_training"]:
        size = (round(800 * scale), round(1333 * scale))
        for compiled in (False, True):
            label, how = f"{backbone} {size[0]}x{size[1]}, batch {batch_size}", "compiled" if compiled else "eager"
            if time.perf_counter() > deadline:
                report.add(f"| {label} | {how} | skipped: out of time | | | | | | |")
                continue
            overrides = {"backbone": backbone, "scale": scale, "amp": True, **shapes["overrides"], "compile": compiled}
            with unittest.mock.patch.object(torch, "compile", compile_with):
                step = train_step.training_step(overrides, size, batch_size, device)
                first = time.perf_counter()
                step()
                train_step.synchronize(device)
                first = time.perf_counter() - first
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                for _ in range(shapes["train_iters"]):
                    step()
                train_step.synchronize(device)
                rate = batch_size * shapes["train_iters"] / (time.perf_counter() - start)
                costs = train_step.host_costs(step, device, dispatch_mode=False)
            peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f}" if device.type == "cuda" else "n/a"
            target = TARGETS.get(("compiled", backbone))
            verdict = f">= {target}: {'met' if rate >= target else 'MISSED'}" if compiled and target else ""
            report.add(f"| {label} | {how} | {rate:.2f} | {first:.0f} | {peak} | {costs['host aten calls']} | "
                       f"{costs.get('kernel launches', 'n/a')} | {costs.get('waits for the device', 'n/a')} | {verdict} |")
            print(report.lines[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report.add("")


def official_step(report: Report, device: torch.device, shapes: dict, official: Path | None, deadline: float):
    """bench/official_step.py for each of shapes["official"], in a process of its own (the official code goes
    on sys.path), its figures into the report."""
    if official is None:
        report.add("Not run: no `--official DIR` (`make gpu-check OFFICIAL=DIR`).", "")
        return
    for backbone, size, batch_size in shapes["official"]:
        command = [sys.executable, "bench/official_step.py", "--official", str(official), "--device", device.type,
                   "--backbone", backbone, "--size", *map(str, size), "--batch-size", str(batch_size),
                   "--pairs", str(shapes["official_pairs"])]
        shown = " ".join(["python", *command[1:]])
        if time.perf_counter() > deadline:
            report.add(f"`{shown}`: skipped, out of time", "")
            continue
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                timeout=max(60.0, deadline - time.perf_counter()))
        print(result.stdout[-4000:], result.stderr[-3000:], flush=True)
        figures = [line for line in result.stdout.splitlines() if line.startswith("DINO-4scale") or "s/step" in line]
        report.add(f"`{shown}`: exit code {result.returncode}", "", *[f"    {line}" for line in figures], "")


def inference_shape(device: torch.device) -> tuple[str, tuple[int, int]]:
    return ("r50", (800, 1333)) if device.type == "cuda" else ("r18", (64, 96))


def inference_step(report: Report, device: torch.device, shapes: dict, reference: dict):
    """Eager fp32 and bf16, then compiled (on a GPU also bf16 and bf16 with CUDA graphs); each run's
    detections against `reference`, those of the eager fp32 model on the host's CPU, the same weights and
    image (inference.output_agreement)."""
    backbone, size = inference_shape(device)
    report.add(f"{backbone} {size[0]}x{size[1]}, batch 1, image tensor on the device to boxes on the host (fp32 as "
               f"eval.py runs it: cuDNN's convolutions in TF32, torch's default; step 6 shows what that moves):", "",
               "| precision | path | images/s | first call s | agreement with the CPU's fp32 eager run | target |",
               "| --- | --- | --- | --- | --- | --- |")
    runs = [(False, "eager"), (True, "eager"), (False, "compiled")]
    if device.type == "cuda":  # (compiling for bf16 on the CPU is slow, and not a CPU user's path)
        runs += [(True, "compiled"), (True, "compiled, CUDA graphs")]
    for amp, path in runs:
        mode = "reduce-overhead" if "CUDA graphs" in path else None
        fps, first, out = train_step.time_inference(backbone, size, shapes["inference_iters"], device, amp,
                                                    compile_mode=mode, compiled=path != "eager", **shapes["overrides"])
        found, score_gap, _ = output_agreement(out, reference)
        precision = train_step.precision_name(device, amp)
        verdict = ""
        if precision == "bf16" and device.type == "cuda":
            verdict = f">= {TARGETS['r50 fps bf16']}: {'met' if fps >= TARGETS['r50 fps bf16'] else 'MISSED'}"
        report.add(f"| {precision} | {path} | {fps:.1f} | {first:.1f} | {100 * found:.0f}% of the 100 best detections, "
                   f"scores within {score_gap:.1e} | {verdict} |")
        print(report.lines[-1], flush=True)
    report.add("")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="gpu_check.md", help="where the markdown goes (default gpu_check.md)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks this script, measures nothing")
    parser.add_argument("--budget", type=float, default=420, help="seconds after which training configurations are skipped")
    parser.add_argument("--compile-budget", type=float, default=240,
                        help="seconds more, after --budget, for step 7's compiled training (compilation included)")
    parser.add_argument("--official", type=Path, help="a checkout of IDEA-Research/DINO: step 8 compares with it")
    parser.add_argument("--official-budget", type=float, default=180,
                        help="seconds more, after step 7's, for step 8's comparisons with the official code")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py needs a CUDA GPU (or --dry-run)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes = DRY if args.dry_run else FULL
    start = time.perf_counter()
    report = Report(Path(args.output))
    report.add(f"### GPU check, {datetime.date.today().isoformat()}", "",
               f"`python bench/gpu_check.py{' --dry-run' if args.dry_run else ''}`", "", *environment(device), "")
    step(report, "1. kernel build and self-check")(lambda: kernel_step(report, device))
    step(report, "2. pytest -m cuda")(lambda: pytest_step(report, timeout=240))
    step(report, "3. kernel against reference")(lambda: msda_step(report, device, shapes))
    step(report, "4. training step")(lambda: training_step(report, device, shapes, start + args.budget))
    # the CPU's run of the model that steps 5 and 6 time and compare, made once for both
    reference = functools.cache(lambda: gpu_agreement.cpu_reference(device, *inference_shape(device),
                                                                    shapes["overrides"]))
    step(report, "5. inference")(lambda: inference_step(report, device, shapes, reference().seen["outputs"]))
    step(report, "6. where the GPU departs from the CPU")(
        lambda: report.add(*gpu_agreement.measure(device, inference_shape(device)[0], reference())))
    step(report, "7. compiled training step")(
        lambda: compiled_training_step(report, device, shapes, start + args.budget + args.compile_budget))
    step(report, "8. against the official code")(lambda: official_step(
        report, device, shapes, args.official and args.official.resolve(),
        start + args.budget + args.compile_budget + args.official_budget))
    report.add(f"Total {time.perf_counter() - start:.0f} s.")
    print("\n" + "\n".join(report.lines))
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
