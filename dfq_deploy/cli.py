"""Command line: argument parsing only; each subcommand calls one library function.

Errors in user input end with one line on stderr and exit code 2; Ctrl-C exits with 130 and leaves no
half-written files (every output is written atomically).

Under ``torchrun`` (``torchrun --nproc-per-node N -m dfq_deploy synth ...``, or ``export`` with a synthesis
``--calib``) every rank synthesises its share of the images; rank 0 logs, shows the progress bar, writes the
outputs and prints the result, the other ranks log errors only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dfq_deploy.config import (
    CORRECTION_MODES,
    GRAPH_DTYPES,
    PARITY_THRESHOLD,
    CalibrationConfig,
    CorrectionConfig,
)
from dfq_deploy.errors import CollectiveError, DfqError
from dfq_deploy.trt.plan import CALIBRATORS, DEFAULT_WORKSPACE_MB, PRECISIONS

logger = logging.getLogger("dfq_deploy")


def _model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    from dfq_deploy.config import BUNDLED_MODEL

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None if required else BUNDLED_MODEL,
                   help=f"timm name or alias (deit_t, deit_s, deit_b, vit_s, vit_b, vit_l, swin_t, swin_s, swin_b); "
                        f"default: the bundled {BUNDLED_MODEL}")
    g.add_argument("--checkpoint", help="local weights: .safetensors or a torch state dict")
    g.add_argument("--model-kwargs", help="architecture overrides, e.g. img_size=32,patch_size=4,depth=6")
    g.add_argument("--random-weights", action="store_true", help="random initialisation (tests, speed benchmarks)")


def _device_args(p: argparse.ArgumentParser) -> None:
    from dfq_deploy.config import DEVICE_CHOICES, SYNTH_PRECISIONS

    p.add_argument("--device", default=DEVICE_CHOICES[0],
                   help=f"where the PyTorch work runs: {', '.join(DEVICE_CHOICES)} or cuda:N (default "
                        f"{DEVICE_CHOICES[0]}: CUDA when torch sees a GPU, else the CPU)")
    p.add_argument("--synth-dtype", choices=SYNTH_PRECISIONS,
                   help="synthesis compute precision: bf16 autocast or fp32 (default: bf16 on a CUDA GPU that has "
                        "it, fp32 elsewhere); ranges, corrections and parity are float32 either way")


def _spec(args: argparse.Namespace):
    from dfq_deploy.models import ModelSpec, parse_model_kwargs

    return ModelSpec(args.model, args.checkpoint, parse_model_kwargs(args.model_kwargs), args.random_weights)


def cmd_export(args: argparse.Namespace) -> int:
    from dfq_deploy.config import preset, preset_for_bits
    from dfq_deploy.pipeline import ExportOptions, export_model

    bits = int(args.bits) if str(args.bits).isdigit() else str(args.bits).lower()
    cfg = preset(args.preset) if args.preset else preset_for_bits(bits)
    if args.block_size:
        cfg = cfg.with_(block_size=args.block_size)
    auto = None
    if args.auto:
        from dfq_deploy.quant.search import AutoConfig

        fields = {"formats": tuple(args.auto_formats.split(","))} if args.auto_formats else {}
        auto = AutoConfig(budget=args.auto, cost_table=args.cost_table, **fields)
    spec = _spec(args)
    label = cfg.name if cfg.w_bits is not None else {16: "FP16", 32: "FP32"}.get(bits, cfg.name)
    if auto is not None:
        label = "auto-" + args.auto.replace(":", "")
    out = args.output or f"out/{spec.name}-{label}"
    calibration = CalibrationConfig(source=args.calib, num_samples=args.num_samples, iterations=args.synth_iters,
                                    precision=args.synth_dtype, calib_dir=args.calib_dir, calib_from=args.calib_from)
    correction = CorrectionConfig(mode=args.correct, shrink=args.shrink, reparam=args.reparam,
                                  reconstruct=args.reconstruct, reconstruct_iters=args.reconstruct_iters)
    report = export_model(ExportOptions(
        model=spec, bits=bits, quant=cfg, calibration=calibration, correction=correction, dtype=args.dtype,
        output=out, seed=args.seed, parity_threshold=args.parity_threshold, eval_data=args.eval_data,
        eval_limit=args.eval_limit, auto=auto, progress=not args.quiet, plot=args.plot, device=args.device,
    ))
    if "artifact" not in report:  # a torchrun rank other than 0: it synthesised its share, rank 0 exports
        return 0
    from dfq_deploy.export.parity import parity_sets

    sets = parity_sets(report["parity"]).values()
    n, bad = sum(v["n"] for v in sets), sum(v["disagreeing"] for v in sets)
    line = (f"wrote {report['artifact']} ({report['size_bytes'] / 1e6:.2f} MB, {report['quant_config']['name']}, "
            f"{report['dtype'].upper()} graph); ONNX Runtime agrees with PyTorch within rounding on {n - bad} of {n} "
            "inputs")
    if "accuracy" in report:
        acc = report["accuracy"]
        line += f"; accuracy of the exported model: top-1 {100 * acc['top1']:.2f}% on {acc['n']} images"
    print(line)
    from dfq_deploy.quant.estimate import describe

    print(describe(report["estimate"]))
    if report.get("mixed"):
        m = report["mixed"]
        counts = ", ".join(f"{k} x{v}" for k, v in m["counts"].items() if v)
        print(f"mixed precision ({m['budget']}): {counts}; {m['effective_bits']:.2f} effective weight bits; "
              f"per-unit formats in report.json['mixed']['units']")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    import torch

    import dfq_deploy.quant  # noqa: F401  (registers dfqvit's fake-quant student for --options hard_student)
    from dfq_deploy.device import resolve_device
    from dfq_deploy.models import create_model, data_config
    from dfq_deploy.synth import METHODS, method_options, synthesize_to_dir
    from dfq_deploy.synth.distributed import init_from_env, is_main_process
    from dfq_deploy.synth.method import options_example

    spec = _spec(args)
    spec.timm_name  # noqa: B018 - an unknown model fails before anything else
    METHODS.get(args.method)
    example = options_example(args.method)
    try:
        options = json.loads(args.options) if args.options else None
    except json.JSONDecodeError as exc:
        raise DfqError(f"--options is not valid JSON ({exc.msg}): write e.g. '{example}' for {args.method}") from None
    if options is not None and not isinstance(options, dict):
        raise DfqError(f"--options must be a JSON object, e.g. '{example}' for {args.method}")
    if args.synth_dtype is not None:
        options = {**(options or {}), "precision": args.synth_dtype}
    try:  # every option checked against the method before any model work
        method_options(args.method, options, num_samples=args.num_samples, iterations=args.iters, seed=args.seed)
    except DfqError as exc:
        raise DfqError(f"{exc}; e.g. --options '{example}' for {args.method}") from None
    device = init_from_env(resolve_device(args.device))  # under torchrun: join the group; cuda:LOCAL_RANK
    out = args.output or f"out/synth-{spec.name}-{args.method}"
    torch.manual_seed(args.seed)  # --random-weights: the same seed builds the same model, so --resume matches
    model = create_model(spec).to(device)
    calib = synthesize_to_dir(model, data_config(model), args.method, num_samples=args.num_samples, iters=args.iters,
                          output_dir=out, seed=args.seed, resume=args.resume, options=options,
                          progress=not args.quiet, checkpoint_every=args.checkpoint_every,
                          model_info=spec.to_dict())
    if is_main_process():
        print(f"wrote {len(calib)} {args.method} images to {out} (images.safetensors, contact_sheet.png, loss.png)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dfq_deploy.data import ImageFolder
    from dfq_deploy.export.evaluate import evaluate_onnx, evaluate_torch

    ImageFolder(args.data)  # a bad folder fails before the model is built
    if args.onnx:
        result = evaluate_onnx(args.onnx, args.data, args.limit, args.batch_size, progress=not args.quiet)
    else:
        from dfq_deploy.models import create_model, data_config

        model = create_model(_spec(args))
        result = evaluate_torch(model, args.data, data_config(model), args.limit, args.batch_size,
                                progress=not args.quiet)
        result["artifact"] = f"pytorch:{args.model} (full precision)"
    print(json.dumps(result))
    print(f"{result['artifact']}: top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  "
          f"on {result['n']} images of {result['data']}", file=sys.stderr)
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    from dfq_deploy.export.lint import ADVISORY_RULES, lint_onnx

    violations = lint_onnx(args.onnx)
    for v in violations:
        print(f"{v} (advisory: the engine builds, slower)" if v.rule in ADVISORY_RULES else v)
    errors = sum(v.rule not in ADVISORY_RULES for v in violations)
    if errors:
        print(f"{args.onnx}: {errors} TensorRT rule violation(s)", file=sys.stderr)
        return 1
    print(f"{args.onnx}: passes TensorRT's explicit-quantization rules"
          + (f" ({len(violations)} advisory)" if violations else ""), file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dfq_deploy.bench.latency import run_benchmark
    from dfq_deploy.bench.power import auto_sampler
    from dfq_deploy.bench.report import write_reports

    result = run_benchmark(
        args.artifacts, runtime=args.runtime, batches=_int_list(args.batch, "--batch"), warmup=args.warmup,
        iters=args.iters, seconds=args.seconds, threads=args.threads, progress=not args.quiet,
        power_sampler=auto_sampler(tegrastats_log=args.tegrastats_log), cuda_graphs=not args.no_cuda_graphs,
    )
    written = write_reports(result, args.output, accuracy_from=args.accuracy_from or ())
    print((Path(args.output) / "bench.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dfq_deploy.bench.report import merge_reports

    _, md, _ = merge_reports(args.dirs, output=args.output)
    print(md)
    return 0


def _skipped_steps(args: argparse.Namespace) -> list[str]:
    """The steps ``--skip-gpu-tests`` / ``--skip-energy`` leave out of ``acceptance`` (with or without TensorRT)."""
    return [step for step, flag in (("gpu-tests", args.skip_gpu_tests), ("energy", args.skip_energy)) if flag]


def cmd_acceptance(args: argparse.Namespace) -> int:
    if args.no_tensorrt:
        return cmd_gpucheck(args)
    from dfq_deploy.acceptance import acceptance_plan, check_environment, passed, run_acceptance

    if not args.dry_run:
        check_environment()  # one line, before any work (or a torch import), when TensorRT or the GPU is missing
    from dfq_deploy.data import default_cifar10

    args.data = args.data or str(default_cifar10("dev"))
    skip = _skipped_steps(args)
    if args.dry_run:
        for step in acceptance_plan(args.outdir, args.data, args.limit, tests_dir=args.tests, skip=skip):
            print(f"{step.name}: {step.detail}")
        return 0
    result = run_acceptance(args.outdir, args.data, args.limit, progress=not args.quiet, tests_dir=args.tests,
                            skip=skip)
    print((Path(args.outdir) / "acceptance.md").read_text())
    return 0 if passed(result) else 1


def cmd_gpucheck(args: argparse.Namespace) -> int:
    from dfq_deploy import gpucheck

    skip = _skipped_steps(args)
    gpucheck.check_arguments(args.outdir, skip, data=args.data, limit=args.limit)
    if args.dry_run:
        for step in gpucheck.gpucheck_plan(args.outdir, tests_root=args.tests, skip=skip):
            print(f"{step.name}: {step.detail}")
        return 0
    gpucheck.check_environment(skip)  # one line, before any work, when the GPU (or pynvml) is missing
    result = gpucheck.run_gpucheck(args.outdir, tests_root=args.tests, skip=skip, progress=not args.quiet)
    print((Path(args.outdir) / "gpucheck.md").read_text())
    return 0 if gpucheck.passed(result) else 1


def cmd_build(args: argparse.Namespace) -> int:
    from dfq_deploy.trt import build_engine, plan_build
    from dfq_deploy.trt.commands import nvidia_commands

    plan = plan_build(args.onnx, args.precision, workspace_mb=args.workspace, batch=args.batch,
                      timing_cache=args.timing_cache, calibrator=args.calibrator, calib_from=args.calib_from,
                      output=args.output, range_profile=not args.no_range_profile)
    commands = nvidia_commands(plan)
    if args.dry_run:
        print(plan.to_json())  # stdout stays the plan's JSON; NVIDIA's equivalents go to stderr
        print(f"# the same build with trtexec:\n{commands['trtexec']}", file=sys.stderr)
        print(f"# TensorRT vs ONNX Runtime with polygraphy:\n{commands['polygraphy']}", file=sys.stderr)
        return 0
    print(f"wrote {build_engine(plan)} (trtexec and polygraphy equivalents in its .json)")
    return 0


def _target(args: argparse.Namespace):
    from dfq_deploy.serve.target import Target

    return Target(trt_version=args.trt_version, compute_capability=args.compute_capability, gpu=args.gpu)


def cmd_serve_triton(args: argparse.Namespace) -> int:
    from dfq_deploy.serve.triton import TritonOptions, docker_command, write_triton_repository

    opts = TritonOptions(name=args.model, batch=_int_list(args.batch, "--batch") if args.batch else None,
                         instances=args.instances, kind=args.kind, max_queue_delay_us=args.max_queue_delay_us,
                         trt_accelerator=not args.no_trt_accelerator, target=_target(args))
    repo = write_triton_repository(args.out, args.artifacts, opts)
    print(f"wrote {repo.model_dir} (config.pbtxt, model, preprocess.json); serve it with:\n{docker_command(args.out)}")
    return 0


def cmd_serve_deepstream(args: argparse.Namespace) -> int:
    from dfq_deploy.serve.deepstream import (
        CONFIG_FILE,
        DeepStreamOptions,
        gst_launch_command,
        write_deepstream_config,
    )

    opts = DeepStreamOptions(batch_size=args.batch_size, threshold=args.threshold, gie_id=args.gie_id,
                             gpu_id=args.gpu_id, target=_target(args))
    result = write_deepstream_config(args.out, args.artifacts, opts)
    print(f"wrote {result.out / CONFIG_FILE} (+ labels and model); run it with:\n"
          f"{gst_launch_command(result.out / CONFIG_FILE)}")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DfqError(f"{flag} '{text}' must be comma-separated integers, e.g. 1,8,32") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfq-deploy", description="Data-free quantization of ViTs for TensorRT / ONNX.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # -v / -q also accepted after the subcommand
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)

    cal, cor = CalibrationConfig(), CorrectionConfig()  # the defaults live in the configs
    e = sub.add_parser(
        "export", parents=[common], help="quantize a model and write a TensorRT-ready QDQ ONNX + report.json")
    _model_args(e)
    e.add_argument("--bits", default="8",
                   help="8 (W8A8), 4 (W4A16), 3 (W3A16), fp8 (FP8 E4M3 W8A8: Ada, Hopper, Blackwell, Thor), nvfp4 "
                        "(NVFP4 W4A4: Blackwell, Thor), 16/32 (float graph in FP16/FP32); default 8")
    e.add_argument("--preset", help="a named deployable preset instead of --bits (e.g. W2A16, FP8, NVFP4)")
    e.add_argument("--dtype", choices=GRAPH_DTYPES,
                   help=f"the graph's compute type: {GRAPH_DTYPES[0]} (default, fp32 for --bits 32; what TensorRT "
                        "builds) or fp32 (CPU runtimes); input and output stay float32")
    e.add_argument("--block-size", type=int, help="INT4 weight block size along the input dim (default 128)")
    from dfq_deploy.quant.search import AutoConfig

    e.add_argument("--auto", metavar="KIND:VALUE",
                   help="mixed precision: one format per Linear and attention group, chosen from synthetic probes to "
                        "meet a budget: bits:3.5 (average weight bits), size:1.5 (MB of weights as stored), "
                        "drop:0.5 (largest predicted top-1 drop, points), latency:MS (with --cost-table)")
    e.add_argument("--auto-formats", metavar="F1,F2,...",
                   help=f"candidate formats for --auto (default {','.join(AutoConfig().formats)})")
    e.add_argument("--cost-table", help="JSON of measured per-unit latencies for --auto latency:MS")
    e.add_argument("--calib", default=cal.source,
                   help=f"calibration source: a data-free method (psaq, spdfq, dfqvit; default {cal.source}, "
                        "the benchmark's best), noise, or real (with --calib-dir)")
    e.add_argument("--calib-dir", help="ImageFolder for --calib real")
    e.add_argument("--calib-from", help="calibrate with a saved `dfq-deploy synth` output folder")
    e.add_argument("--correct", default=cor.mode, choices=CORRECTION_MODES,
                   help=f"closed-form activation correction folded into the weights (default {cor.mode})")
    e.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=cor.shrink,
                   help="move each correction towards the identity by a strength chosen on held-out calibration "
                        f"images (default {'on' if cor.shrink else 'off'})")
    e.add_argument("--reparam", action="store_true",
                   help="fold per-channel LayerNorm output scales into the weights before calibration (W8A8)")
    e.add_argument("--reconstruct", action="store_true", help="block-wise reconstruction (Adam) before correcting")
    e.add_argument("--reconstruct-iters", type=int, default=cor.reconstruct_iters,
                   help=f"reconstruction steps per block (default {cor.reconstruct_iters})")
    e.add_argument("--plot", action="store_true", help="write correction.png (per-block error before/after)")
    e.add_argument("--num-samples", type=int, default=cal.num_samples,
                   help=f"calibration images (default {cal.num_samples})")
    e.add_argument("--synth-iters", type=int, default=cal.iterations,
                   help=f"synthesis iterations when --calib is a data-free method (default {cal.iterations})")
    _device_args(e)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--output", help="output folder (default out/<model>-<preset>)")
    e.add_argument("--eval-data", help="ImageFolder to measure the exported model's accuracy on")
    e.add_argument("--eval-limit", type=int, help="evaluate a seeded subset of this many images")
    e.add_argument("--parity-threshold", type=float, default=PARITY_THRESHOLD,
                   help="min fraction of parity inputs where ONNX Runtime matches PyTorch within rounding "
                        f"(default {PARITY_THRESHOLD}; 0 skips the check, to debug only)")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "synth", parents=[common], help="synthesize calibration images from the model alone (data-free)")
    _model_args(s)
    s.add_argument("--method", default=cal.source,
                   help=f"psaq, spdfq or dfqvit (default {cal.source}, export's default source)")
    s.add_argument("--num-samples", type=int, default=32)
    s.add_argument("--iters", type=int, help="optimisation steps (default: the method's)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--options", help='method options as JSON, e.g. \'{"global_frac": 0.3}\' for dfqvit, '
                                     '\'{"alpha1": 100}\' for spdfq (unknown keys are refused before any work)')
    _device_args(s)
    s.add_argument("--checkpoint-every", type=int, default=200)
    s.add_argument("--resume", action="store_true", help="continue the run saved in --output up to --iters")
    s.add_argument("--output", help="output folder (default out/synth-<model>-<method>)")
    s.set_defaults(func=cmd_synth)

    v = sub.add_parser(
        "eval", parents=[common], help="top-1/top-5 of an exported ONNX (--onnx) or a float PyTorch model (--model)")
    v.add_argument("--onnx", help="an ONNX file written by dfq-deploy export")
    _model_args(v)
    v.add_argument("--data", required=True, help="ImageFolder directory (class folders sorted give labels)")
    v.add_argument("--limit", type=int, help="evaluate a seeded subset of this many images")
    v.add_argument("--batch-size", type=int, default=64)
    v.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench", parents=[common], help="latency (and energy where measurable) of ONNX files or TensorRT engines")
    b.add_argument("artifacts", nargs="+", help="ONNX files or engines; the first is the baseline")
    b.add_argument("--runtime", choices=["ort", "trt"], default="ort")
    b.add_argument("--batch", default="1,8,32", help="batch sizes, e.g. 1,8,32")
    b.add_argument("--warmup", type=int, default=10)
    budget = b.add_mutually_exclusive_group()
    budget.add_argument("--iters", type=int, help="timed runs per artifact and batch (default 100)")
    budget.add_argument("--seconds", type=float, help="timed seconds per artifact and batch")
    b.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    b.add_argument("--no-cuda-graphs", action="store_true",
                   help="time TensorRT engines without CUDA graphs (default: with, so small batches measure the "
                        "engine rather than kernel launches; recorded in bench.json)")
    b.add_argument("--tegrastats-log", help="a tegrastats log recorded during the run (Jetson fallback)")
    b.add_argument("--accuracy-from", nargs="+", help="export report.json files, for accuracy-vs-latency plots")
    b.add_argument("--output", required=True, help="folder for bench.json / .csv / .md and plots")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser(
        "build", parents=[common], help="build a TensorRT engine from an exported ONNX (needs TensorRT and a GPU)")
    t.add_argument("onnx")
    t.add_argument("--precision", choices=PRECISIONS, default="best",
                   help="int8/int4 for QDQ exports, fp8 for FP8 exports (compute capability >= 8.9), fp4 for NVFP4 "
                        "ones (>= 10.0: Blackwell, Thor), fp16 for an FP16 float export (--bits 16), fp32 for an FP32 "
                        "one (--bits 32), strongly typed without precision flags; best: what the graph holds (with "
                        "--calibrator: implicit INT8, weakly typed)")
    t.add_argument("--workspace", type=int, default=DEFAULT_WORKSPACE_MB, help="workspace memory pool in MB")
    t.add_argument("--batch", help="batch sizes, one optimisation profile each with kernels tuned for exactly that "
                                   "batch, e.g. 1,8,32 (the default for a dynamic batch)")
    t.add_argument("--no-range-profile", action="store_true",
                   help="leave out the last profile over MIN..MAX of --batch (then only the listed sizes run)")
    t.add_argument("--timing-cache", help="timing cache file, read and updated")
    t.add_argument("--calibrator", choices=CALIBRATORS,
                   help="implicit INT8 calibration of an FP32 float export (--bits 32); TensorRT 10.x only")
    t.add_argument("--calib-from", help="a dfq-deploy synth output folder with images.safetensors")
    t.add_argument("--output", help="engine path (default <onnx stem>.engine)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the build plan as JSON (stdout) and its trtexec and polygraphy lines (stderr), and stop")
    t.set_defaults(func=cmd_build)

    a = sub.add_parser(
        "acceptance", parents=[common],
        help="the GPU acceptance run: export, build, engine accuracy vs ONNX Runtime, GPU tests, latency, energy")
    a.add_argument("outdir")
    a.add_argument("--data", help="ImageFolder for the accuracy checks (default: the shared CIFAR-10 dev split)")
    a.add_argument("--limit", type=int, help="check accuracy on a seeded subset of this many images")
    a.add_argument("--tests", help="the GPU tests to run (default: tests/trt of the source checkout; with "
                                   "--no-tensorrt: the checkout's tests folder, whose CUDA tests run)")
    a.add_argument("--skip-gpu-tests", action="store_true",
                   help="leave the GPU tests out (shown in the summary); without it, tests that cannot be found, "
                        "collected or run fail the acceptance")
    a.add_argument("--skip-energy", action="store_true",
                   help="leave energy out (shown in the summary); without it, a latency without energy fails")
    a.add_argument("--no-tensorrt", action="store_true",
                   help="the GPU check for a machine with an NVIDIA GPU and PyTorch CUDA but no TensorRT: CPU vs CUDA "
                        "synthesis, the CUDA tests, NVML energy, a torchrun launch; writes gpucheck.json/.md")
    a.add_argument("--dry-run", action="store_true", help="print the steps and stop")
    a.set_defaults(func=cmd_acceptance)

    r = sub.add_parser(
        "report", parents=[common], help="merge several bench/export output folders into one table and plot")
    r.add_argument("dirs", nargs="+")
    r.add_argument("--output", help="folder for report.md / .csv / .png")
    r.set_defaults(func=cmd_report)

    _serve_parser(sub, common)

    lint = sub.add_parser(
        "lint", parents=[common], help="check an ONNX graph against TensorRT's explicit-quantization rules")
    lint.add_argument("onnx")
    lint.set_defaults(func=cmd_lint)
    return p


def _serve_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sv = sub.add_parser("serve", parents=[common],
                        help="configs for NVIDIA's servers: a Triton model repository or a DeepStream nvinfer config")
    kinds = sv.add_subparsers(dest="server", required=True)
    target = argparse.ArgumentParser(add_help=False)
    g = target.add_argument_group("target (checked against an engine's build record)")
    g.add_argument("--trt-version", help="the TensorRT version the server runs, e.g. 10.3.0")
    g.add_argument("--compute-capability", help="the server GPU's compute capability, e.g. 8.7 (Orin), 9.0 (H100)")
    g.add_argument("--gpu", help="the server GPU's name")
    artifacts_help = "an exported model.onnx, or a model.engine (with its build record) and the .onnx it was built from"

    tr = kinds.add_parser("triton", parents=[common, target], help="write OUT/NAME: config.pbtxt, 1/model.plan or "
                          "1/model.onnx, labels.txt, preprocess.json")
    tr.add_argument("out", help="the model repository folder (may hold other models)")
    tr.add_argument("artifacts", nargs="+", help=artifacts_help)
    tr.add_argument("--model", required=True, help="the model name (its folder in the repository)")
    tr.add_argument("--batch", help="batch sizes of an ONNX graph, e.g. 1,8,32 (the default); an engine's come from "
                                    "its profiles")
    tr.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    tr.add_argument("--kind", default="KIND_GPU", help="instance kind: KIND_GPU (default), KIND_CPU (ONNX only) or "
                                                      "KIND_AUTO")
    tr.add_argument("--max-queue-delay-us", type=int, default=0,
                    help="dynamic batcher's wait for a fuller batch, microseconds (default 0)")
    tr.add_argument("--no-trt-accelerator", action="store_true",
                    help="ONNX: run on ONNX Runtime's CUDA provider instead of its TensorRT accelerator")
    tr.set_defaults(func=cmd_serve_triton)

    ds = kinds.add_parser("deepstream", parents=[common, target],
                          help="write OUT: an nvinfer classifier config, labels.txt and the model")
    ds.add_argument("out", help="a new folder for the config")
    ds.add_argument("artifacts", nargs="+", help=artifacts_help)
    ds.add_argument("--batch-size", type=int, help="nvinfer batch-size (default 1 for ONNX, profile 0's for engines)")
    ds.add_argument("--threshold", type=float, default=0.0,
                    help="classifier-threshold on the class probability (default 0: always the top class)")
    ds.add_argument("--gie-id", type=int, default=1, help="gie-unique-id (default 1)")
    ds.add_argument("--gpu-id", type=int, default=0, help="gpu-id (default 0)")
    ds.set_defaults(func=cmd_serve_deepstream)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    worker = os.environ.get("RANK", "0").strip() not in ("", "0")  # a torchrun rank other than 0
    if worker:
        level = logging.ERROR  # logs and progress come from rank 0
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("onnxscript", "torch", "onnx_ir", "timm"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except DfqError as exc:
        if not (worker and isinstance(exc, CollectiveError)):  # raised alike on every rank: said once, by rank 0
            print(f"dfq-deploy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfq-deploy: interrupted (no partial outputs were written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["main", "build_parser"]
