"""The speed benchmark: mergesmith against mergekit on Llama checkpoints of 135M, 542M and 1.1B parameters.

``make bench-speed`` (``python -m mergesmith.bench.speed``) creates three random-init bf16 Llama checkpoints per size
(a base and two fine-tunes: base + small noise), then, per size and method, runs ``mergesmith merge --compat
mergekit`` and ``mergekit-yaml`` on the same recipe as whole processes, alternately, ``--runs`` times each, plus
two floors:

- the I/O floor: read every input tensor and write the output with safetensors alone, no arithmetic;
- the naive loop: the plainest merge script (per tensor: load, fp32 weighted sum, cast, save), no engine.

Every run starts after ``sync`` (no dirty pages of the previous run's output: mergesmith fsyncs its output before
renaming it into place, mergekit does not, so its writeback would otherwise land in the next run). Per run it
records the wall time, the peak anonymous memory (RssAnon, polled every few ms) and the peak total
RSS (VmHWM), and compares the outputs tensor by tensor. Results: ``bench/results/speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mergesmith.io.reader import CheckpointSource
from mergesmith.version import __version__

SIZES: dict[str, dict[str, int]] = {
    # Llama architecture, untied, vocab 32000, full multi-head attention (no GQA): parameter counts in the name
    "135m": {"hidden_size": 1024, "num_hidden_layers": 6, "intermediate_size": 2816},
    "542m": {"hidden_size": 2048, "num_hidden_layers": 8, "intermediate_size": 5632},
    "1.1b": {"hidden_size": 2048, "num_hidden_layers": 18, "intermediate_size": 5632},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64},  # the harness's own test
}
VOCAB = 32000

# method -> (mergesmith/mergekit merge_method, shared parameters, per-model parameters)
METHODS: dict[str, tuple[str, dict, dict]] = {
    "linear": ("linear", {}, {"weight": 1.0}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 1.0}, {"weight": 0.5}),
    "ties": ("ties", {"normalize": True}, {"weight": 1.0, "density": 0.5}),
    "dare_ties": ("dare_ties", {"normalize": True}, {"weight": 1.0, "density": 0.5}),
}


def llama_tensors(size: str) -> list[tuple[str, tuple[int, ...]]]:
    c = SIZES[size]
    h, inter = c["hidden_size"], c["intermediate_size"]
    names = [("model.embed_tokens.weight", (VOCAB, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        names += [
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]
    return names


def parameter_count(size: str) -> int:
    return sum(torch.Size(s).numel() for _, s in llama_tensors(size))


def make_checkpoint(path: Path, size: str, seed: int, base: Path | None = None, noise: float = 0.002) -> Path:
    """A random-init bf16 Llama folder (config + sharded safetensors); with ``base``, base + seeded noise."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (path / "model.safetensors.index.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    c = SIZES[size]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    g = torch.Generator().manual_seed(seed)
    shard, shard_bytes, index, n = {}, 0, {}, 0
    base_index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"] if base else {}

    def flush() -> None:
        nonlocal shard, shard_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, shard_bytes, n = {}, 0, n + 1

    for name, shape in llama_tensors(size):
        if base is None:
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        else:
            with safe_open(str(base / base_index[name]), framework="pt") as f:
                t = f.get_tensor(name).float() + torch.randn(shape, generator=g) * noise
        shard[name] = t.to(torch.bfloat16)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= 1_000_000_000:
            flush()
    flush()
    total = sum((tmp / f).stat().st_size for f in set(index.values()))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    tmp.rename(path)
    return path


def recipe(method: str, models: list[Path]) -> dict:
    merge_method, shared, per_model = METHODS[method]
    base, experts = models[0], models[1:]
    if merge_method == "linear":
        entries = [{"model": str(m), "parameters": dict(per_model)} for m in models]
        return {"merge_method": "linear", "models": entries, "dtype": "bfloat16"}
    entries = [{"model": str(m), "parameters": dict(per_model)} for m in experts]
    return {
        "merge_method": merge_method,
        "base_model": str(base),
        "models": entries,
        "parameters": dict(shared),
        "dtype": "bfloat16",
    }


@dataclass
class Measured:
    seconds: float
    peak_anon_mb: float
    peak_rss_mb: float
    returncode: int


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> Measured:
    """Run ``cmd`` as one process; poll its RssAnon (peak anonymous memory) and VmHWM (peak RSS)."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115  (closed below)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, **(env or {})})
    peaks = {"RssAnon": 0, "VmHWM": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for key in peaks:
                value = _status_kb(proc.pid, key)
                if value is not None:
                    peaks[key] = max(peaks[key], value)
            time.sleep(0.005)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    code = proc.wait()
    seconds = time.perf_counter() - start
    done.set()
    poller.join()
    if log:
        out.close()
    return Measured(seconds, peaks["RssAnon"] / 1024, peaks["VmHWM"] / 1024, code)


# ---------------------------------------------------------------------------------------------------------
# The floors, run as their own processes: `python -m mergesmith.bench.speed floor {io,naive} RECIPE OUT`


def _weight_maps(paths: list[str]) -> list[dict[str, str]]:
    return [json.loads((Path(p) / "model.safetensors.index.json").read_text())["weight_map"] for p in paths]


def floor(kind: str, recipe_path: Path, out: Path) -> None:
    """I/O floor (read all inputs, write the first model's tensors) or naive loop (fp32 weighted sum)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    r = yaml.safe_load(recipe_path.read_text())
    paths = [m["model"] for m in r["models"]]
    weights = [float(m["parameters"].get("weight", 1.0)) for m in r["models"]]
    maps = _weight_maps(paths)
    out.mkdir(parents=True, exist_ok=True)
    handles: dict[tuple[int, str], object] = {}

    def get(i: int, name: str) -> torch.Tensor:
        key = (i, maps[i][name])
        if key not in handles:
            handles[key] = safe_open(str(Path(paths[i]) / maps[i][name]), framework="pt")
        return handles[key].get_tensor(name)  # type: ignore[attr-defined]

    shard: dict[str, torch.Tensor] = {}
    size, n = 0, 0
    for name in maps[0]:
        tensors = [get(i, name) for i in range(len(paths))]
        if kind == "io":
            result = tensors[0]
        else:
            total = sum(w for w in weights)
            result = (sum(w * t.float() for w, t in zip(weights, tensors)) / total).to(tensors[0].dtype)
        shard[name] = result
        size += result.numel() * result.element_size()
        if size >= 5_000_000_000:
            save_file(shard, str(out / f"model-{n:05d}.safetensors"))
            shard, size, n = {}, 0, n + 1
    if shard:
        save_file(shard, str(out / f"model-{n:05d}.safetensors"))


# ---------------------------------------------------------------------------------------------------------


def compare_outputs(a: Path, b: Path) -> dict[str, float]:
    """Largest difference between two merged folders, in bf16 ulps of the larger value and absolute."""
    sa, sb = CheckpointSource(a), CheckpointSource(b)
    worst_abs, mismatched, total = 0.0, 0, 0
    names = set(sa.keys())
    if names != set(sb.keys()):
        raise RuntimeError(f"{a} and {b} hold different tensor names")
    for name in sorted(names):
        x, y = sa.get(name).float(), sb.get(name).float()
        diff = (x - y).abs()
        # one bf16 ulp at the magnitude of the values (2^-7 relative)
        ulp = torch.maximum(x.abs(), y.abs()) * 2.0**-7
        mismatched += int((diff > ulp + 1e-30).sum())
        total += diff.numel()
        worst_abs = max(worst_abs, float(diff.max()))
    return {"max_abs_diff": worst_abs, "beyond_one_bf16_ulp": mismatched, "elements": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mergesmith.bench.speed", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command")
    f = sub.add_parser("floor")
    f.add_argument("kind", choices=("io", "naive"))
    f.add_argument("recipe", type=Path)
    f.add_argument("out", type=Path)
    parser.add_argument("--sizes", default="135m,542m,1.1b")
    parser.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,ties_paper")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runs-by-size", default="", help="per-size run counts, e.g. 135m=2,1.1b=1")
    parser.add_argument(
        "--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mergesmith-speed"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed"))
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="the src folder of another mergesmith checkout (e.g. a git worktree of an earlier "
        "commit): its merges run beside this one's, alternately, as the tool 'baseline'",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace only the (size, method) entries run in an existing <out>.json",
    )
    args = parser.parse_args(argv)
    if args.command == "floor":
        floor(args.kind, args.recipe, args.out)
        return 0
    results = run_benchmark(args)
    existing = args.out.with_suffix(".json")
    if args.update and existing.exists():
        old = json.loads(existing.read_text())
        sizes = old.get("sizes", {})
        for size, entry in results["sizes"].items():  # replace only the (size, method) entries that were run
            kept = sizes.get(size, {}).get("methods", {})
            sizes[size] = {**entry, "methods": {**kept, **entry["methods"]}}
        results["sizes"] = sizes
        results["runs_by_size"] = {**old.get("runs_by_size", {}), **results["runs_by_size"]}
        order = list(SIZES)
        results["sizes"] = dict(
            sorted(
                results["sizes"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)
            )
        )
    write_reports(results, args.out)
    print(markdown(results))
    return 0


def _bin(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


def run_benchmark(args) -> dict:
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.log"
    results: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "runs": args.runs,
        "sizes": {},
    }
    try:
        from importlib.metadata import version

        import mergekit  # noqa: F401

        results["machine"]["mergekit"] = version("mergekit")
    except ImportError:
        args.no_mergekit = True
    results["machine"]["mergesmith"] = __version__
    runs_by_size = {k: int(v) for k, v in (item.split("=") for item in args.runs_by_size.split(",") if item)}
    results["runs_by_size"] = {size: runs_by_size.get(size, args.runs) for size in args.sizes.split(",")}
    baseline_env = None
    if args.baseline is not None:
        if not (args.baseline / "mergesmith").is_dir():
            raise SystemExit(
                f"--baseline {args.baseline}: no mergesmith package in it (give a checkout's src folder)"
            )
        baseline_env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
        results["baseline"] = {"src": str(args.baseline), "commit": _git_commit(args.baseline)}
    for size in args.sizes.split(","):
        print(f"[{size}] creating checkpoints", flush=True)
        base = make_checkpoint(work / size / "base", size, 0)
        models = [base] + [make_checkpoint(work / size / f"ft{i}", size, i, base) for i in (1, 2)]
        print(
            f"[{size}] reading the inputs once ({_warm(models):.1f} s): no tool pays for a cold page cache",
            flush=True,
        )
        size_result: dict = {"parameters": parameter_count(size), "methods": {}}
        results["sizes"][size] = size_result
        for method in args.methods.split(","):
            paper = method == "ties_paper"
            r = recipe("ties" if paper else method, models)
            recipe_path = work / size / f"{method}.yaml"
            recipe_path.write_text(yaml.safe_dump(r, sort_keys=False))
            tools: dict[str, list[str]] = {}
            outs = {t: work / size / f"out-{method}-{t}" for t in ("mergesmith", "mergekit", "io", "naive")}
            tools["mergesmith"] = [
                _bin("mergesmith"),
                "merge",
                str(recipe_path),
                str(outs["mergesmith"]),
                "--force",
                "--quiet",
            ] + ([] if paper else ["--compat", "mergekit"])
            if args.baseline is not None:  # the same command, importing the other checkout's package
                outs["baseline"] = work / size / f"out-{method}-baseline"
                tools["baseline"] = [
                    *tools["mergesmith"][:3],
                    str(outs["baseline"]),
                    *tools["mergesmith"][4:],
                ]
            if not args.no_mergekit and not paper:
                tools["mergekit"] = [
                    _bin("mergekit-yaml"),
                    str(recipe_path),
                    str(outs["mergekit"]),
                    "--quiet",
                    "--random-seed",
                    "0",
                ]
            if method == "linear":
                for kind in ("io", "naive"):
                    tools[kind] = [
                        sys.executable,
                        "-m",
                        "mergesmith.bench.speed",
                        "floor",
                        kind,
                        str(recipe_path),
                        str(outs[kind]),
                    ]
            runs: dict[str, list[Measured]] = {t: [] for t in tools}
            for i in range(runs_by_size.get(size, args.runs)):
                for tool, cmd in tools.items():
                    shutil.rmtree(outs[tool], ignore_errors=True)
                    # no run pays for the previous one's writeback: mergekit leaves its output dirty in the page
                    # cache (mergesmith fsyncs its own), and the disk writes it back during the next run
                    os.sync()
                    m = run_measured(cmd, env=baseline_env if tool == "baseline" else None, log=log)
                    if m.returncode != 0:
                        raise RuntimeError(f"{tool} failed on {size}/{method} (see {log})")
                    runs[tool].append(m)
                    print(
                        f"[{size}] {method:16s} {tool:10s} run {i + 1}: {m.seconds:7.2f} s  "
                        f"anon {m.peak_anon_mb:7.0f} MB  rss {m.peak_rss_mb:7.0f} MB",
                        flush=True,
                    )
            entry: dict = {"recipe": r, "tools": {}, "commit": _git_commit()}
            for tool, ms in runs.items():
                entry["tools"][tool] = {
                    "seconds": [round(m.seconds, 3) for m in ms],
                    "median_seconds": round(statistics.median(m.seconds for m in ms), 3),
                    "peak_anon_mb": round(max(m.peak_anon_mb for m in ms), 1),
                    "peak_rss_mb": round(max(m.peak_rss_mb for m in ms), 1),
                }
            if "mergekit" in runs:
                entry["compare"] = compare_outputs(outs["mergesmith"], outs["mergekit"])
            if "baseline" in runs:
                entry["compare_baseline"] = compare_outputs(outs["mergesmith"], outs["baseline"])
            if "naive" in runs:
                entry["compare_naive"] = compare_outputs(outs["mergesmith"], outs["naive"])
            size_result["methods"][method] = entry
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    return results


def _git_commit(folder: Path | None = None) -> str | None:
    """The mergesmith commit measured (entries of one report can come from different runs: ``--update``), or the
    commit checked out in ``folder``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=folder or Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _warm(models: list[Path]) -> float:
    """Read every input file once, so that the first timed run (whichever tool) does not read from disk."""
    started = time.perf_counter()
    for model in models:
        for path in sorted(model.iterdir()):
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    return time.perf_counter() - started


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def markdown(results: dict) -> str:
    lines = [
        f"Machine: {results['machine']['cpus']} CPUs, torch {results['machine']['torch']}, mergekit "
        f"{results['machine'].get('mergekit', '–')}; medians of the runs per tool (`runs` per row), tools run "
        "alternately.",
        "",
        "| size | method | runs | mergesmith s | mergekit s | speed-up | mergesmith anon MB | mergekit anon MB | "
        "mergesmith RSS MB | mergekit RSS MB | max |Δ| vs mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = []
    for size, sr in results["sizes"].items():
        for method, e in sr["methods"].items():
            t = e["tools"]
            ms, mk = t["mergesmith"], t.get("mergekit", {})
            cmp = e.get("compare")
            diff = (
                (
                    f"{cmp['max_abs_diff']:.2g}; {100 * cmp['beyond_one_bf16_ulp'] / cmp['elements']:.3f} % of "
                    "elements beyond 1 bf16 ulp"
                )
                if cmp
                else "–"
            )
            lines.append(
                f"| {size} | {method} | {len(ms['seconds'])} | {ms['median_seconds']:.2f} | {_num(mk.get('median_seconds'), 2)} | "
                f"{_ratio(mk.get('median_seconds'), ms['median_seconds'])} | {ms['peak_anon_mb']:.0f} | "
                f"{_num(mk.get('peak_anon_mb'), 0)} | {ms['peak_rss_mb']:.0f} | {_num(mk.get('peak_rss_mb'), 0)} | "
                f"{diff} |"
            )
            if "io" in t:
                floors.append(
                    f"| {size} | {t['io']['median_seconds']:.2f} | {t['naive']['median_seconds']:.2f} | "
                    f"{ms['median_seconds']:.2f} | {_ratio(ms['median_seconds'], t['io']['median_seconds'])} | "
                    f"{_ratio(ms['median_seconds'], t['naive']['median_seconds'])} | {t['naive']['peak_anon_mb']:.0f} |"
                )
    baseline = [
        f"| {size} | {method} | {len(e['tools']['baseline']['seconds'])} | "
        f"{e['tools']['baseline']['median_seconds']:.2f} | {e['tools']['mergesmith']['median_seconds']:.2f} | "
        f"{_ratio(e['tools']['baseline']['median_seconds'], e['tools']['mergesmith']['median_seconds'])} | "
        f"{e['compare_baseline']['max_abs_diff']:.2g} |"
        for size, sr in results["sizes"].items()
        for method, e in sr["methods"].items()
        if "baseline" in e["tools"]
    ]
    if baseline:
        info = results.get("baseline", {})
        lines += [
            "",
            f"Against the baseline checkout (commit {info.get('commit')}), same checkpoints, runs alternating "
            "(speed-up > 1: this commit is faster):",
            "",
            "| size | method | runs | baseline s | mergesmith s | speed-up | max |Δ| vs baseline |",
            "|---|---|---|---|---|---|---|",
            *baseline,
        ]
    lines += [
        "",
        "Floors (linear, 3 models), whole processes:",
        "",
        "| size | I/O floor s | naive loop s | mergesmith s | mergesmith / I/O floor | mergesmith / naive | "
        "naive anon MB |",
        "|---|---|---|---|---|---|---|",
        *floors,
    ]
    return "\n".join(lines) + "\n"


def write_reports(results: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    stem.with_suffix(".md").write_text("# Speed: mergesmith vs mergekit\n\n" + markdown(results))


if __name__ == "__main__":
    raise SystemExit(main())
