"""Every CPU deployment path of DINO-4scale side by side: time per image, and AP on a trained checkpoint.

  eager float32       PyTorch as eval.py runs it (export.Deployable: the CPU kernel, the kept heap)
  eager bf16          the same under --amp (bf16 autocast)
  ONNX Runtime        export.py's file (the attention as gathers, --msda gather), float32
  ONNX Runtime, grid  the file exported with --msda grid_sample
  OpenVINO            the gather file in float32 (onnx_detect.Session), and at OpenVINO's own default
                      precision (bf16 where the CPU has bf16 instructions, else float32)
  INT8 OpenVINO       export.py --int8's copy (NNCF) in OpenVINO

Usage: python bench/deploy_cpu.py [--height 800 --width 1333] [--rounds 3] [--profile]
                                  [--checkpoint demo_output/best.pth --data demo_output/data --ap-size 200 333]
Speed: R50 with random weights (a trained one costs the same), a generated picture letterboxed, batch 1,
2 threads everywhere (idle threads do not spin); one warm-up of each path, then --rounds rounds of all
paths in turn; prints each path's median and its median ratio to eager float32 over the rounds. INT8 is
calibrated on 2 generated pictures (its speed does not depend on them). --profile adds ONNX Runtime's
time per operator type. AP (with --checkpoint and --data): the same paths on that checkpoint, exported
at --ap-size, INT8 calibrated on the first 300 validation images, every validation image letterboxed.
"""
import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from appendix import export  # noqa: E402
from appendix.checkpoints import model_from_checkpoint  # noqa: E402
from appendix.cpu_memory import heap_kept  # noqa: E402
from data import CocoDetection, make_transforms, shapes_image, split_paths  # noqa: E402
from eval import coco_metrics  # noqa: E402
from appendix.detect import letterboxed_results  # noqa: E402
from model import build_dino  # noqa: E402
from appendix.onnx_detect import Session  # noqa: E402
from appendix.precision import amp_autocast  # noqa: E402

THREADS = 2


def eager(deployable, amp: bool):
    def run(feed):
        with heap_kept(torch.device("cpu")), torch.inference_mode(), amp_autocast(torch.device("cpu"), amp):
            return [t.float().numpy() if t.is_floating_point() else t.numpy()
                    for t in deployable(*(torch.from_numpy(feed[k]) for k in export.INPUTS))]
    return run


def openvino_default(path: Path):
    """The file in OpenVINO at its own default precision (Session pins float32)."""
    import openvino
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": THREADS})
    return lambda feed: list(compiled(feed).values())


def paths(deployable, folder: Path, height: int, width: int, calibration: list[Path], grid: bool) -> dict:
    """name -> a callable on the graph's inputs, for every path of the module docstring."""
    files = {msda: folder / f"{msda}.onnx" for msda in (("gather", "grid_sample") if grid else ("gather",))}
    for msda, path in files.items():
        print(f"export ({msda}): {export.export(deployable, path, height, width, 1, False, 17, msda):.0f} s", flush=True)
    print(f"INT8 (NNCF): {export.quantize_int8(files['gather'], folder / 'int8.xml', calibration):.0f} s", flush=True)
    runs = {"eager float32": eager(deployable, False), "eager bf16": eager(deployable, True),
            "ONNX Runtime": Session(files["gather"], threads=THREADS)}
    if grid:
        runs["ONNX Runtime, grid"] = Session(files["grid_sample"], threads=THREADS)
    runs |= {"OpenVINO float32": Session(files["gather"], "openvino", threads=THREADS),
             "OpenVINO default": openvino_default(files["gather"]),
             "INT8 OpenVINO": Session(folder / "int8.xml", "openvino", threads=THREADS)}
    return runs


def speed(args):
    torch.manual_seed(0)
    deployable = export.Deployable(build_dino("r50"), 300)
    with tempfile.TemporaryDirectory() as folder:
        calibration = []
        for i in range(2):
            calibration.append(Path(folder) / f"{i}.jpg")
            shapes_image(random.Random(i), 560, 420)[0].save(calibration[-1])
        runs = paths(deployable, Path(folder), args.height, args.width, calibration, grid=True)
        feed = {k: v.numpy() for k, v in zip(export.INPUTS, export.generated_inputs(1, args.height, args.width))}
        times = {name: [] for name in runs}
        for name, run in runs.items():  # warm-up
            run(feed)
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run(feed)
                times[name].append(time.perf_counter() - start)
        if args.profile:
            profile(Path(folder) / "gather.onnx", feed)
    print(f"\nR50 {args.height}x{args.width}, batch 1, {THREADS} threads, {args.rounds} interleaved rounds, torch "
          f"{torch.__version__}\n| path | s per image | x eager float32 |\n|---|---|---|")
    for name, values in times.items():
        ratio = statistics.median(e / v for e, v in zip(times["eager float32"], values))
        print(f"| {name} | {statistics.median(values):.2f} | {ratio:.2f} |")


def profile(path: Path, feed: dict):
    """ONNX Runtime's and OpenVINO's (float32) time per operator type on one run of the file."""
    import json
    from collections import Counter
    import onnxruntime
    import openvino
    options = onnxruntime.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads = True, THREADS
    options.profile_file_prefix = str(path.with_name("profile"))  # in the benchmark's temporary folder
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    per_op = {"ONNX Runtime": Counter(), "OpenVINO": Counter()}
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op["ONNX Runtime"][event["args"]["op_name"]] += event["dur"] / 1e6
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True,
                                                                "INFERENCE_NUM_THREADS": THREADS})
    request = compiled.create_infer_request()
    request.infer(feed)
    for info in request.profiling_info:
        per_op["OpenVINO"][info.node_type] += info.real_time.total_seconds()
    for runtime, seconds in per_op.items():
        total = sum(seconds.values())
        print(f"\n{runtime}, time per operator type (one run, {total:.1f} s): " + ", ".join(
            f"{op} {100 * t / total:.0f}%" for op, t in seconds.most_common(8)))


def accuracy(args):
    model, cfg, _ = model_from_checkpoint(args.checkpoint)
    deployable = export.Deployable(model, cfg.num_select)
    dataset = CocoDetection(*split_paths("val", args.data, None, None), make_transforms(train=False), log=lambda *a: None)
    calibration = [dataset.image_dir / dataset.coco.imgs[i]["file_name"] for i in dataset.ids[:export.CALIBRATION_IMAGES]]
    with tempfile.TemporaryDirectory() as folder:
        runs = paths(deployable, Path(folder), *args.ap_size, calibration, grid=False)
        with contextlib.redirect_stdout(sys.stderr):  # the progress lines
            results = letterboxed_results(runs, dataset, tuple(args.ap_size))
    print(f"\n{args.checkpoint} on {args.data} ({len(dataset.ids)} images letterboxed to {args.ap_size[0]}x{args.ap_size[1]})"
          "\n| path | AP | AP50 |\n|---|---|---|")
    for name, found in results.items():
        metrics = coco_metrics(dataset.coco, found, dataset.ids)
        print(f"| {name} | {metrics['AP']:.4f} | {metrics['AP50']:.4f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--checkpoint", help="a trained checkpoint for the AP table (with --data)")
    parser.add_argument("--data")
    parser.add_argument("--ap-size", type=int, nargs=2, default=[200, 333], metavar=("H", "W"))
    parser.add_argument("--skip-speed", action="store_true", help="the AP table only")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    if not args.skip_speed:
        speed(args)
    if args.checkpoint and args.data:
        accuracy(args)


if __name__ == "__main__":
    main()
