"""Benchmark reports: ``bench.json``, ``bench.csv``, ``bench.md`` and plots, and merging several runs.

``bench.json`` holds everything: the raw per-run latencies, the summaries, the power trace and energy per
artifact and batch, and the environment (CPU model, GPU and driver, ONNX Runtime / TensorRT versions,
Jetson power mode). The CSV and Markdown files are flat views of it; the plots need matplotlib (the
``plot`` extra) and are drawn with the Agg backend.

Accuracy comes from export ``report.json`` files (``accuracy_from``); :func:`read_top1` says which key it
used. Every file is written atomically (temp file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, figure_png

logger = logging.getLogger(__name__)

BENCH_JSON, BENCH_CSV, BENCH_MD = "bench.json", "bench.csv", "bench.md"
LATENCY_PNG, TRADEOFF_PNG = "latency.png", "tradeoff.png"
MERGED_MD, MERGED_CSV, MERGED_PNG = "report.md", "report.csv", "report.png"

#: Columns of ``bench.csv`` and of the merged table, in order.
COLUMNS = (
    "source", "machine", "artifact", "path", "runtime", "batch", "n", "mean_ms", "p50_ms", "p90_ms", "p99_ms",
    "std_ms", "latency_per_image_ms", "throughput_ips", "p50_ratio_vs_baseline",
    "throughput_ratio_vs_baseline", "gpu_compute_p50_ms", "joules_per_image", "avg_watts", "energy_source",
    "power_rail", "qdq_fused", "integer_kernels", "top1", "top1_key", "skipped",
)


# ----------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------


def _run_cmd(cmd: Sequence[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("%s failed: %s", cmd[0], exc)
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU model from ``/proc/cpuinfo`` (``model name`` on x86, ``Model`` / ``Hardware`` on ARM)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return platform.processor() or None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip().lower(), v.strip())
    for key in ("model name", "model", "hardware", "cpu model", "processor"):
        if fields.get(key) and not fields[key].isdigit():
            return fields[key]
    return platform.processor() or None


def collect_environment(cpuinfo: str | Path = "/proc/cpuinfo",
                        run: Callable[[Sequence[str]], str | None] = _run_cmd,
                        device_tree: str | Path = "/proc/device-tree/model",
                        tegra_release: str | Path = "/etc/nv_tegra_release") -> dict[str, Any]:
    """What the numbers were measured on.

    Args:
        cpuinfo: path of ``/proc/cpuinfo`` (tests pass a fake).
        run: runs a command and returns its stdout or ``None`` (tests pass a fake).
        device_tree: the device-tree model file (names the Jetson board).
        tegra_release: Jetson Linux release file.

    Returns:
        ``cpu_model``, ``cpu_count``, ``machine``, ``os``, ``python``, ``onnxruntime`` (version and
        providers), ``tensorrt`` (version or ``None``), ``gpus`` (name and driver from ``nvidia-smi``),
        ``board`` and ``l4t`` (Jetson), ``power_mode`` (``nvpmodel -q``).
    """
    import os

    env: dict[str, Any] = {
        "cpu_model": cpu_model(cpuinfo),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import onnxruntime as ort

        env["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        env["onnxruntime"] = None
    from dfq_deploy.trt.env import tensorrt_version  # dfq_deploy.trt is the only package importing tensorrt

    try:
        env["tensorrt"] = tensorrt_version()
    except Exception:  # a broken CUDA install raising at import
        env["tensorrt"] = None
    gpus = []
    smi = run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit", "--format=csv,noheader"])
    for line in (smi or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if parts and parts[0]:
            gpus.append({"name": parts[0], "driver": parts[1] if len(parts) > 1 else None,
                         "power_limit": parts[2] if len(parts) > 2 else None})
    env["gpus"] = gpus
    for key, path in (("board", device_tree), ("l4t", tegra_release)):
        try:
            env[key] = Path(path).read_text(errors="replace").replace("\x00", "").strip().splitlines()[0]
        except (OSError, IndexError):
            env[key] = None
    q = run(["nvpmodel", "-q"])
    env["power_mode"] = _parse_nvpmodel(q) if q else None
    return env


def _parse_nvpmodel(text: str) -> str:
    """``NV Power Mode: MAXN`` -> ``MAXN`` (the whole first line when the format differs)."""
    for line in text.splitlines():
        if "power mode" in line.lower() and ":" in line:
            return line.split(":", 1)[1].strip()
    return text.splitlines()[0].strip() if text.strip() else text


def machine_label(env: dict[str, Any] | None) -> str:
    """A short name for the machine: Jetson board, else first GPU, else CPU model."""
    if not env:
        return ""
    if env.get("board"):
        mode = f" [{env['power_mode']}]" if env.get("power_mode") else ""
        return f"{env['board']}{mode}"
    if env.get("gpus"):
        return env["gpus"][0]["name"]
    return env.get("cpu_model") or ""


# ----------------------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------------------


def read_top1(report: dict[str, Any]) -> dict[str, Any] | None:
    """Top-1 from an export ``report.json`` (or an eval result), looked up defensively.

    Keys read, first found wins:

    1. ``accuracy.top1``: top-1 accuracy of the exported model on labelled images (``kind="accuracy"``);
    2. ``top1``: a bare evaluation result (``kind="accuracy"``);
    3. ``parity.held_back.top1_agreement`` then ``parity.calibration.top1_agreement``: agreement of ONNX
       Runtime with the PyTorch model on synthetic inputs (``kind="agreement"``). This is not accuracy and
       the reports label it so.

    Returns:
        ``{"top1": float, "key": dotted key, "kind": "accuracy" | "agreement", "n": images or None}``, or
        ``None`` when the report has none of these.
    """
    if not isinstance(report, dict):
        return None
    acc = report.get("accuracy")
    if isinstance(acc, dict) and _is_number(acc.get("top1")):
        return {"top1": float(acc["top1"]), "key": "accuracy.top1", "kind": "accuracy", "n": acc.get("n")}
    if _is_number(report.get("top1")):
        return {"top1": float(report["top1"]), "key": "top1", "kind": "accuracy", "n": report.get("n")}
    parity = report.get("parity")
    if isinstance(parity, dict):
        for name in ("held_back", "calibration"):
            v = parity.get(name)
            if isinstance(v, dict) and _is_number(v.get("top1_agreement")):
                return {"top1": float(v["top1_agreement"]), "key": f"parity.{name}.top1_agreement",
                        "kind": "agreement", "n": v.get("n")}
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_json(path: str | Path, what: str = "report") -> dict[str, Any]:
    """Read a JSON object; a missing or broken file is a :class:`DfqError`."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except OSError as exc:
        raise DfqError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise DfqError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): pass the {what} "
                       "dfq-deploy wrote") from exc
    if not isinstance(obj, dict):
        raise DfqError(f"{path} is not a {what} (expected a JSON object)")
    return obj


def attach_accuracy(result: dict[str, Any], accuracy_from: Sequence[str | Path]) -> dict[str, Any]:
    """Add ``accuracy`` (from :func:`read_top1`) to the benchmarked artifacts, in place.

    A report is matched to the artifact whose path equals its ``artifact`` key, else to the artifact in the
    same folder as the report; with as many reports as artifacts and no match, by position (logged).

    Raises:
        DfqError: a report cannot be read, has no top-1, or matches no artifact.
    """
    arts = result.get("artifacts", [])
    unmatched = []
    for rp in accuracy_from:
        rp = Path(rp)
        report = load_json(rp, "export report.json")
        top = read_top1(report)
        if top is None:
            raise DfqError(f"{rp} has no accuracy.top1 or parity top1_agreement: export with --eval-data, "
                           "or drop it from --accuracy-from")
        top["report"] = str(rp)
        target = None
        if isinstance(report.get("artifact"), str):
            want = _resolve(report["artifact"], rp.parent)
            target = next((a for a in arts if _resolve(a["path"]) == want), None)
        if target is None:
            target = next((a for a in arts if _resolve(a["path"]).parent == rp.resolve().parent), None)
        if target is None:
            unmatched.append((rp, top))
            continue
        target["accuracy"] = top
    if unmatched:
        free = [a for a in arts if "accuracy" not in a]
        if len(unmatched) == len(accuracy_from) == len(arts):
            for a, (rp, top) in zip(arts, unmatched, strict=True):
                logger.warning("%s matches no artifact by path; assigned to %s by position", rp, a["path"])
                a["accuracy"] = top
        elif len(unmatched) == len(free) == 1:
            logger.warning("%s matches no artifact by path; assigned to the only one left, %s",
                           unmatched[0][0], free[0]["path"])
            free[0]["accuracy"] = unmatched[0][1]
        else:
            names = ", ".join(str(rp) for rp, _ in unmatched)
            raise DfqError(f"cannot tell which artifact {names} belongs to: pass the report.json written "
                           "next to each benchmarked model, in the same order as the artifacts")
    return result


def _resolve(p: str | Path, base: Path | None = None) -> Path:
    p = Path(p)
    if not p.is_absolute() and base is not None and not p.exists():
        p = base / p.name
    try:
        return p.resolve()
    except OSError:
        return p


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def table_rows(result: dict[str, Any], source: str = "", machine: str | None = None) -> list[dict[str, Any]]:
    """One flat row per artifact and batch size (keys: :data:`COLUMNS`)."""
    if machine is None:
        machine = machine_label(result.get("environment"))
    rows = []
    for art in result.get("artifacts", []):
        kernels = (art.get("info") or {}).get("kernels") or {}
        ints = ";".join(f"{k}={v}" for k, v in (kernels.get("integer_kernels") or {}).items()) or None
        acc = art.get("accuracy") or {}
        for b in art.get("batches", []):
            row: dict[str, Any] = dict.fromkeys(COLUMNS)
            row.update(source=source, machine=machine, artifact=art["name"], path=art["path"],
                       runtime=result.get("runtime"), batch=b["batch"],
                       qdq_fused=kernels.get("qdq_fused"),
                       integer_kernels=ints,
                       top1=acc.get("top1"), top1_key=acc.get("key"))
            if "skipped" in b:
                row["skipped"] = b["skipped"]
                rows.append(row)
                continue
            lat = b["latency"]
            for k in ("n", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms", "latency_per_image_ms",
                      "throughput_ips"):
                row[k] = lat.get(k)
            compute = (b.get("gpu_timings") or {}).get("compute")
            row["gpu_compute_p50_ms"] = compute.get("p50_ms") if compute else None
            vs = b.get("vs_baseline") or {}
            own = 1.0 if art.get("baseline") else None
            row["p50_ratio_vs_baseline"] = vs.get("p50_ratio", own)
            row["throughput_ratio_vs_baseline"] = vs.get("throughput_ratio", own)
            e = b.get("energy") or {}
            if e.get("available"):
                row.update(joules_per_image=e.get("joules_per_image"), avg_watts=e.get("avg_watts"),
                           energy_source=e.get("source"), power_rail=e.get("rail"))
            rows.append(row)
    return rows


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    return buf.getvalue()


def _f(v: Any, fmt: str = "{:.3g}") -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def _top1_cell(row: dict[str, Any]) -> str:
    if row.get("top1") is None:
        return "–"
    return f"{100 * row['top1']:.2f}% ({top1_kind(row)})"


def rows_to_markdown(rows: Sequence[dict[str, Any]], with_source: bool = False) -> str:
    """A Markdown table of :func:`table_rows` rows."""
    head = (["Source", "Machine"] if with_source else []) + [
        "Artifact", "Batch", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "img/s", "p50 vs base",
        "J/img", "W (rail)", "Top-1 (accuracy or agreement)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        lead = [_f(r.get("source")), _f(r.get("machine"))] if with_source else []
        if r.get("skipped"):
            cells = lead + [str(r["artifact"]), str(r["batch"]), f"skipped: {r['skipped']}"] + ["–"] * 7 + [
                _top1_cell(r)]
        elif r.get("p50_ms") is None:
            cells = lead + [str(r["artifact"]), _f(r.get("batch"))] + ["–"] * 8 + [_top1_cell(r)]
        else:
            ratio = r.get("p50_ratio_vs_baseline")
            watts = (f"{r['avg_watts']:.2f} ({r['power_rail']})" if r.get("avg_watts") is not None else "–")
            cells = lead + [
                str(r["artifact"]), str(r["batch"]), _f(r["p50_ms"], "{:.3f}"), _f(r["p90_ms"], "{:.3f}"),
                _f(r["p99_ms"], "{:.3f}"), f"{r['mean_ms']:.3f} ± {r['std_ms']:.3f}",
                _f(r["throughput_ips"], "{:.1f}"), "–" if ratio is None else f"{ratio:.3f}×",
                _f(r.get("joules_per_image"), "{:.4g}"), watts, _top1_cell(r),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bench_markdown(result: dict[str, Any]) -> str:
    """The ``bench.md`` summary: setup, table, kernels per ONNX artifact, energy source and warnings."""
    env = result.get("environment") or {}
    cfg = result.get("config", {})
    rows = table_rows(result)
    out = ["# Benchmark", ""]
    budget = f"{cfg.get('iters')} runs" if cfg.get("iters") is not None else f"{cfg.get('seconds')} s"
    out.append(f"- runtime: **{result.get('runtime')}**; batches {cfg.get('batches')}; "
               f"warm-up {cfg.get('warmup')}; "
               f"{budget} per artifact and batch, interleaved over {cfg.get('rounds')} rounds; "
               f"threads: {cfg.get('threads') or 'default'}")
    if env:
        ort = env.get("onnxruntime") or {}
        label = machine_label(env)
        machine = f"machine: {label}; " if label and label != env.get("cpu_model") else ""
        out.append(f"- {machine}CPU: {env.get('cpu_model')}; "
                   f"ONNX Runtime {ort.get('version', '–')}; TensorRT {env.get('tensorrt') or '–'}; "
                   f"power mode: {env.get('power_mode') or '–'}")
    power = result.get("power") or {}
    if power.get("available"):
        rate = power.get("sample_rate_hz")
        line = f"- energy: {power.get('source')}, rail **{power.get('rail')}** ({power.get('rail_note')})"
        out.append(line + (f", sampled at {rate:.1f} Hz" if rate else ""))
    else:
        out.append(f"- energy: not measured ({power.get('reason', 'no power sampler')})")
    baseline = next((a["name"] for a in result.get("artifacts", []) if a.get("baseline")), None)
    if baseline:
        out.append(f"- baseline for ratios: **{baseline}** (ratio < 1: faster than the baseline)")
    out += ["", rows_to_markdown(rows)]
    kern = [a for a in result.get("artifacts", []) if (a.get("info") or {}).get("kernels")]
    if kern:
        out += ["## Kernels ONNX Runtime runs", ""]
        for a in kern:
            k = a["info"]["kernels"]
            if "error" in k:
                out.append(f"- **{a['name']}**: optimized graph unreadable ({k['error']})")
                continue
            ints = ", ".join(f"{n}×{c}" for n, c in k.get("integer_kernels", {}).items()) or "none"
            verdict = {True: "QDQ fused into integer kernels",
                       False: "QDQ not fused (dequantize + float MatMul)",
                       "partial": "QDQ partly fused",
                       None: "no quantization ops"}.get(k.get("qdq_fused"), "?")
            out.append(f"- **{a['name']}**: {verdict}; integer kernels: {ints}; DequantizeLinear left: "
                       f"{k.get('dequantize_linear', 0)}; float MatMul/Gemm: {k.get('float_matmul', 0)}")
        out.append("")
    where: dict[str, list[str]] = {}
    for a in result.get("artifacts", []):
        for b in a.get("batches", []):
            for w in (b.get("energy") or {}).get("warnings", []) or []:
                where.setdefault(w, []).append(f"{a['name']} b={b['batch']}")
    notes = [f"- {w} ({', '.join(at)})" for w, at in where.items()]
    phases = [(a["name"], b) for a in result.get("artifacts", []) for b in a.get("batches", [])
              if b.get("gpu_timings")]
    if phases:
        out += ["## TensorRT time per phase (p50 ms; GPU compute apart from copies)", ""]
        for name, b in phases:
            parts = ", ".join(f"{k} {v['p50_ms']:.3f}" for k, v in b["gpu_timings"].items())
            out.append(f"- {name} b={b['batch']}: {parts}; host latency {b['latency']['p50_ms']:.3f}")
        out.append("")
    if any(r.get("top1_key", "") and "agreement" in str(r.get("top1_key")) for r in rows):
        notes.append("- Top-1 marked (agreement) is ONNX Runtime vs PyTorch agreement on synthetic inputs, "
                     "not accuracy on labelled data")
    if notes:
        out += ["## Notes", ""] + notes + [""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError("plots need matplotlib: pip install 'dfq-deploy[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    atomic_write_bytes(path, figure_png(fig, dpi=120, tight=True))
    return path


def plot_latency(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """p50 latency (with p90 whisker) and throughput by batch size, one line per artifact (and source).

    Returns:
        the PNG path, or ``None`` when no row has latency.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("p50_ms") is None:
            continue
        key = f"{r['artifact']} ({r['source']})" if r.get("source") else str(r["artifact"])
        groups.setdefault(key, []).append(r)
    if not groups:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["batch"])
        x = [r["batch"] for r in rs]
        p50 = [r["p50_ms"] for r in rs]
        up = [r["p90_ms"] - r["p50_ms"] for r in rs]
        ax1.errorbar(x, p50, yerr=[[0] * len(x), up], marker="o", capsize=3, label=label)
        ax2.plot(x, [r["throughput_ips"] for r in rs], marker="o", label=label)
    ticks = sorted({r["batch"] for rs in groups.values() for r in rs})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency per batch, ms (p50, whisker to p90)")
    ax2.set_ylabel("throughput, images/s")
    ax2.legend(fontsize=8)
    fig.suptitle("Latency by batch size")
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


#: The two kinds of top-1 a row can carry (:func:`read_top1`), each plotted on its own axis, never together.
TOP1_KINDS = {"accuracy": "top-1 accuracy on labelled images, %",
              "agreement": "top-1 agreement with PyTorch on synthetic inputs\n(not accuracy), %"}


def top1_kind(row: dict[str, Any]) -> str:
    """``accuracy`` or ``agreement`` (ONNX Runtime vs PyTorch on synthetic inputs) of a row's top-1."""
    return "agreement" if str(row.get("top1_key") or "").startswith("parity") else "accuracy"


def tradeoff_figure(rows: Sequence[dict[str, Any]], batch: int | None = None) -> Any:
    """The figure :func:`plot_tradeoff` saves, or None when no row has both top-1 and latency.

    One row of panels per kind of top-1 present (:data:`TOP1_KINDS`): accuracy and agreement never share an axis,
    so an export measured only by agreement (about 99%) cannot look better than one with a real top-1.
    """
    pts = [r for r in rows if r.get("top1") is not None and r.get("p50_ms") is not None]
    if not pts:
        return None
    if batch is None:
        by_art: dict[tuple[Any, Any], set[int]] = {}
        for r in pts:
            by_art.setdefault((r.get("source"), r["artifact"]), set()).add(r["batch"])
        common = set.intersection(*by_art.values())
        batch = min(common) if common else min(r["batch"] for r in pts)
    pts = [r for r in pts if r["batch"] == batch]
    kinds = [k for k in TOP1_KINDS if any(top1_kind(r) == k for r in pts)]
    energy = any(r.get("joules_per_image") is not None for r in pts)
    plt = _pyplot()
    ncols = 2 if energy else 1
    fig, axes = plt.subplots(len(kinds), ncols, figsize=(5.5 * ncols, 4.2 * len(kinds)), squeeze=False)
    for row_axes, kind in zip(axes, kinds, strict=True):
        mine = [r for r in pts if top1_kind(r) == kind]
        panels = [(row_axes[0], mine, "latency_per_image_ms", f"latency per image at batch {batch}, ms (p50)")]
        if energy:
            panels.append((row_axes[1], [r for r in mine if r.get("joules_per_image") is not None],
                           "joules_per_image", "energy per image, J"))
        for ax, rs, key, xlabel in panels:
            for r in rs:
                ax.scatter(r[key], 100 * r["top1"], s=40, marker="o" if kind == "accuracy" else "s")
                label = f"{r['artifact']}" + (f" ({r['source']})" if r.get("source") else "")
                ax.annotate(label, (r[key], 100 * r["top1"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(TOP1_KINDS[kind])
            ax.locator_params(axis="x", nbins=5)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
            ax.margins(x=0.15, y=0.15)
            ax.grid(True, alpha=0.3)
            if not rs:
                ax.text(0.5, 0.5, "no energy measured", transform=ax.transAxes, ha="center", fontsize=8)
        if energy:
            rails = sorted({f"{r['energy_source']}:{r['power_rail']}" for r in mine
                            if r.get("joules_per_image") is not None})
            row_axes[1].set_title("rail: " + ", ".join(rails), fontsize=8)
    fig.suptitle("Accuracy vs cost" if kinds == ["accuracy"] else
                 "Accuracy and agreement vs cost (separate panels: agreement is not accuracy)")
    return fig


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: str | Path, batch: int | None = None) -> Path | None:
    """Top-1 against latency per image (and against energy per image when measured): :func:`tradeoff_figure`.

    Args:
        rows: :func:`table_rows` rows.
        path: PNG to write.
        batch: batch size to compare at; the smallest one every plotted artifact has when ``None``.

    Returns:
        the PNG path, or ``None`` when no row has both top-1 and latency.
    """
    fig = tradeoff_figure(rows, batch)
    if fig is None:
        return None
    plt = _pyplot()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------


def write_bench_json(result: dict[str, Any], output: str | Path) -> Path:
    """``OUTPUT/bench.json``: the full result (raw samples, summaries, energy, environment)."""
    return atomic_write_json(Path(output) / BENCH_JSON, result)


def write_bench_csv(result: dict[str, Any], output: str | Path) -> Path:
    """``OUTPUT/bench.csv``: one row per artifact and batch size."""
    return atomic_write_text(Path(output) / BENCH_CSV, rows_to_csv(table_rows(result)))


def write_bench_md(result: dict[str, Any], output: str | Path) -> Path:
    """``OUTPUT/bench.md``: the Markdown summary."""
    return atomic_write_text(Path(output) / BENCH_MD, bench_markdown(result))


def write_reports(result: dict[str, Any], output: str | Path, accuracy_from: Sequence[str | Path] = (),
                  environment: dict[str, Any] | None = None, plots: bool | None = None) -> dict[str, Path]:
    """Write every benchmark output into ``output``.

    Args:
        result: :func:`dfq_deploy.bench.latency.run_benchmark`'s result (gets ``environment`` and, with
            ``accuracy_from``, per-artifact ``accuracy`` added in place).
        output: folder to write to (created).
        accuracy_from: export ``report.json`` files whose top-1 to attach (see :func:`read_top1`).
        environment: from :func:`collect_environment` (collected now when ``None``).
        plots: ``True`` to require the plots, ``False`` to skip them, ``None`` to draw them when
            matplotlib is installed (a warning otherwise).

    Returns:
        ``{"json", "csv", "md", "latency_png", "tradeoff_png"}`` paths that were written.

    Raises:
        DfqError: an accuracy report is unreadable or unmatched, or the folder is not writable.
        MissingDependencyError: ``plots=True`` without matplotlib (the text files are written first).
    """
    out = Path(output)
    if accuracy_from:
        attach_accuracy(result, accuracy_from)
    result["environment"] = environment if environment is not None else collect_environment()
    written = {"json": write_bench_json(result, out), "csv": write_bench_csv(result, out),
               "md": write_bench_md(result, out)}
    if plots is False:
        return written
    rows = table_rows(result)
    try:
        p = plot_latency(rows, out / LATENCY_PNG)
        if p is not None:
            written["latency_png"] = p
        p = plot_tradeoff(rows, out / TRADEOFF_PNG)
        if p is not None:
            written["tradeoff_png"] = p
    except MissingDependencyError:
        if plots:
            raise
        logger.warning("plots skipped: matplotlib is not installed (pip install 'dfq-deploy[plot]')")
    return written


def merge_reports(dirs: Sequence[str | Path], output: str | Path | None = None,
                  plots: bool | None = None) -> tuple[list[dict[str, Any]], str, Path | None]:
    """Merge several bench / export output folders (e.g. one from a Jetson, one from a desktop).

    Each folder contributes its ``bench.json`` rows (labelled with the folder name as ``source`` and the
    machine it ran on), with top-1 from an artifact's attached accuracy or, failing that, from the folder's
    ``report.json`` when it benchmarked one artifact. A folder with only an export ``report.json``
    contributes one accuracy-only row.

    Args:
        dirs: folders written by ``dfq-deploy bench`` or ``dfq-deploy export``.
        output: when given, ``report.md``, ``report.csv`` and ``report.png`` are written there.
        plots: as in :func:`write_reports`.

    Returns:
        ``(rows, markdown, plot path or None)``.

    Raises:
        DfqError: a folder is missing or has neither ``bench.json`` nor ``report.json``.
    """
    rows: list[dict[str, Any]] = []
    labels = _source_labels([Path(d) for d in dirs])
    for d, label in zip((Path(x) for x in dirs), labels, strict=True):
        if not d.is_dir():
            raise DfqError(f"not a folder: {d} (pass folders written by dfq-deploy bench or export)")
        bench, export = d / BENCH_JSON, d / "report.json"
        if bench.is_file():
            result = load_json(bench, "bench.json")
            if not isinstance(result.get("artifacts"), list):
                raise DfqError(f"{bench} is not a dfq-deploy bench result (no artifacts list)")
            top = read_top1(load_json(export, "report.json")) if export.is_file() else None
            new = table_rows(result, source=label)
            if top is not None and len({r["artifact"] for r in new}) == 1:
                for r in new:
                    if r["top1"] is None:
                        r.update(top1=top["top1"], top1_key=top["key"])
            rows += new
        elif export.is_file():
            report = load_json(export, "report.json")
            top = read_top1(report) or {}
            row: dict[str, Any] = dict.fromkeys(COLUMNS)
            art = report.get("artifact") or str(d)
            row.update(source=label, machine="", artifact=Path(art).parent.name or Path(art).stem, path=art,
                       top1=top.get("top1"), top1_key=top.get("key"))
            rows.append(row)
        else:
            raise DfqError(f"{d} has neither {BENCH_JSON} nor report.json: pass folders written by "
                           "dfq-deploy bench or export")
    md = "# Comparison\n\n" + rows_to_markdown(rows, with_source=True)
    if any("agreement" in str(r.get("top1_key") or "") for r in rows):
        md += ("\nTop-1 marked (agreement) is ONNX Runtime vs PyTorch agreement on synthetic inputs, "
               "not accuracy.\n")
    plot_path: Path | None = None
    if output is not None:
        out = Path(output)
        atomic_write_text(out / MERGED_MD, md)
        atomic_write_text(out / MERGED_CSV, rows_to_csv(rows))
        if plots is not False:
            try:
                plot_path = _merged_plot(rows, out / MERGED_PNG)
            except MissingDependencyError:
                if plots:
                    raise
                logger.warning("plot skipped: matplotlib is not installed (pip install 'dfq-deploy[plot]')")
    return rows, md, plot_path


def _source_labels(dirs: Sequence[Path]) -> list[str]:
    """Folder names, made unique with their parent's name where two are equal."""
    names = [d.name or str(d) for d in dirs]
    out = []
    for d, n in zip(dirs, names, strict=True):
        out.append(n if names.count(n) == 1 else f"{d.parent.name}/{n}")
    return out


def _merged_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy vs latency when any row has top-1 and latency, else latency by batch."""
    if any(r.get("top1") is not None and r.get("p50_ms") is not None for r in rows):
        return plot_tradeoff(rows, path)
    return plot_latency(rows, path)
