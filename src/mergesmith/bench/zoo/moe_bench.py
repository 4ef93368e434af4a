"""The MoE benchmark (#19): the LLM zoo's experts (fine-tunes of the real SmolLM2-135M on different skills)
upcycled into a Mixtral — the mergekit-moe use case on real models — then routed, merged, compressed and routed
by top-p.

Rows, each scored per skill on the first ``eval_limit`` test prompts (exact match and answer loss, as the LLM
table; normalized accuracy = a row's exact match over the skill's own expert's, with its 95 % bootstrap interval):

- ``expert:<skill>``: the dense experts (the zoo's reference evaluations on the same prompts, cached);
- ``upcycled:<gate>``: ``mergesmith moe`` with every skill's expert, ``positive_prompts`` its first training
  prompts, under each gate mode; ``routed:<gate>``: the same after router training (experts and everything else
  frozen; the mixed skills' training answers, next-token loss);
- on the ``hidden`` gate's routed model (mergekit's default mode; chosen before any score is seen):
  ``m-smoe@G`` and its four baselines at G = 50 % and 25 % of the experts (calibration: mixed training prompts),
  ``compressed:rR-ρ`` (the 50 % M-SMoE model's experts low-rank + sparse, one-shot), and ``top-p:p`` (mean experts
  per token reported) against ``top-1`` and the model's own top-2.

Every built model lives under ``<zoo>/moe/`` and every scored row in ``<out>/runs/moe/`` (keyed by the model's
output sha256), so a stopped run resumes; ``mergesmith bench --zoo moe`` builds only the zoo's base and experts
(no multi-task model, no 200-prompt reference rows) and writes ``bench/results/moe.{json,md,png}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergesmith.api.moe import build_moe
from mergesmith.api.moe_compress import compress_moe
from mergesmith.api.moe_merge import merge_moe_experts
from mergesmith.bench.zoo.llm import (
    LLMZoo,
    LLMZooConfig,
    encode_examples,
    fine_tune,
    normalized_exact_match,
    reference_evaluations,
)
from mergesmith.errors import MergeError
from mergesmith.fit.data import pad_id
from mergesmith.fit.hf import load_causal_lm
from mergesmith.fit.losparse import expert_modules
from mergesmith.fit.moe_routing import named_routers, routers, top_p_routing
from mergesmith.io.cache import keyed_json
from mergesmith.io.output import atomic_folder
from mergesmith.io.reader import CheckpointSource
from mergesmith.io.writer import sha256_file
from mergesmith.ops.expert_merge import permute_expert

MERGE_METHODS = ("m-smoe", "m-smoe-no-align", "uniform", "frequency-prune", "random-drop")


@dataclass(frozen=True)
class MoEBenchConfig:
    # the experts upcycled: the lower bound of 4, the zoo's first four skills (its strongest experts), so
    # that a fresh machine builds them (~40 min on 2 cores) and runs the bench in one sitting; () = every skill
    skills: tuple[str, ...] = ("arithmetic", "json", "python_output", "topic")
    # every gate mode of the issue; the first is the model merged, compressed and routed by top-p
    gate_modes: tuple[str, ...] = ("hidden", "cheap_embed", "random", "uniform_random")
    prompts_per_expert: int = 8
    router_steps: int = 60
    router_lr: float = 1e-3
    eval_limit: int = 50
    group_fractions: tuple[float, ...] = (0.5, 0.25)
    # (rank, remaining share of S's rows, distillation steps): one-shot (magnitude pruning, 0 steps) from MC-SMoE's
    # settings up to a mild one, and the paper's way (pruning on the cubic schedule while distilling) at one setting
    compress: tuple[tuple[int, float, int], ...] = (
        (8, 0.1, 0),
        (32, 0.1, 0),
        (32, 0.25, 0),
        (128, 0.5, 0),
        (32, 0.25, 40),
    )
    top_p: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    calibration: int = 96
    seed: int = 0

    @classmethod
    def quick(cls) -> MoEBenchConfig:
        """`bench --zoo moe --quick`: every row, on fewer router steps and prompts, one one-shot compression."""
        return cls(router_steps=10, eval_limit=10, compress=((8, 0.1, 0),))


BUILD_RECORD = "mergesmith_bench_build.json"  # what the bench did to a model it wrote (router training, …)
WRITE_RECORD = "mergesmith_bench_write.json"  # what the bench asked a mergesmith command to write there


def model_stamp(folder: Path) -> str:
    """What a built model is: the stamp of what the bench did to it, else the sha256 of the files mergesmith wrote."""
    record = folder / BUILD_RECORD
    if record.exists():
        return json.dumps(json.loads(record.read_text())["stamp"], sort_keys=True)
    return json.dumps(json.loads((folder / "manifest.json").read_text())["output_sha256"], sort_keys=True)


def parameter_counts(folder: Path) -> dict[str, int]:
    """The parameters a model folder stores (``model``) and its experts' (``experts``), from the safetensors
    headers; a compressed model counts its experts' factors (``expert_parameters_stored``), not the dense
    reconstruction it also holds for loading."""
    source = CheckpointSource(folder)
    try:
        sizes = {name: math.prod(source.info(name)[1]) for name in source.keys()}
    finally:
        source.close()
    experts = sum(size for name, size in sizes.items() if ".experts." in name)
    manifest = folder / "manifest.json"
    record = json.loads(manifest.read_text()) if manifest.exists() else {}
    stored = record.get("moe_compress", {}).get("expert_parameters_stored", experts)
    return {"model": sum(sizes.values()) - experts + stored, "experts": stored}


def moe_config(zoo: LLMZoo, gate_mode: str, config: MoEBenchConfig) -> dict[str, Any]:
    """The mergekit-moe config of the upcycled MoE: the zoo's base, one expert per skill."""
    experts = []
    for skill in zoo.skills:
        prompts = [e.prompt for e in zoo.split(skill, "train")[: config.prompts_per_expert]]
        experts.append({"source_model": str(zoo.expert(skill)), "positive_prompts": prompts})
    return {
        "base_model": str(zoo.base),
        "gate_mode": gate_mode,
        "experts_per_token": 2,
        "experts": experts,
        "seed": config.seed,
    }


def calibration_file(zoo: LLMZoo, path: Path, count: int) -> Path:
    """Mixed training prompts with their answers (``text`` column), every skill in turn."""
    per_skill = max(1, count // len(zoo.skills))
    rows = [
        {"text": f"{e.prompt} {e.answer}"}
        for i in range(per_skill)
        for skill in zoo.skills
        for e in zoo.split(skill, "train")[i : i + 1]
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _saved(module: torch.nn.Module, tokenizer: Any, out: Path, record: dict[str, Any]) -> Path:
    """``module`` and ``tokenizer`` written atomically to ``out`` with ``record`` (its stamp first)."""
    with atomic_folder(out, force=True) as tmp:
        module.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / BUILD_RECORD).write_text(json.dumps(record) + "\n")
    return out


def _written(write: Callable[..., object], source: Any, folder: Path, inputs: Any, **settings: Any) -> Path:
    """``folder``, written by ``write(source, folder, **settings)`` unless it holds that write already: the
    record the bench leaves beside mergesmith's output names the same ``inputs`` (what the source models are)
    and settings (a data file by its sha256). Keyed on inputs and settings, not on code (docs/design.md)."""
    progress_only = ("force", "progress")
    key = {
        "source": str(source) if isinstance(source, Path) else source,
        "inputs": inputs,
        "settings": {
            k: sha256_file(v) if isinstance(v, Path) else v
            for k, v in settings.items()
            if k not in progress_only
        },
    }
    record = folder / WRITE_RECORD
    text = json.dumps(key, sort_keys=True) + "\n"
    if (folder / "manifest.json").exists() and record.exists() and record.read_text() == text:
        return folder
    write(source, folder, **settings)
    record.write_text(text)  # after the atomic write: a crash in between writes it again
    return folder


def _built(out: Path, stamp: dict[str, Any]) -> bool:
    record = out / BUILD_RECORD
    return record.exists() and json.loads(record.read_text()).get("stamp") == stamp


def train_routers(folder: Path, out: Path, zoo: LLMZoo, config: MoEBenchConfig, progress: bool) -> Path:
    """The MoE of ``folder`` with its routers trained on the mixed skills (everything else frozen), saved to ``out``
    (skipped when ``out`` holds this training of this model)."""
    stamp = {"model": model_stamp(folder), "steps": config.router_steps, "lr": config.router_lr}
    if _built(out, stamp):
        return out
    module = load_causal_lm(folder)
    tokenizer = zoo.tokenizer()
    data = [encode_examples(tokenizer, zoo.split(s, "train")) for s in zoo.skills]
    settings = dataclasses.replace(
        LLMZooConfig(**zoo.manifest["config"]) if "config" in zoo.manifest else LLMZooConfig(),
        lr=config.router_lr,
    )
    router_names = {f"{name}.weight" for _, name, _ in named_routers(module)}
    report = fine_tune(
        module,
        data,
        config.router_steps,
        settings,
        pad_id(tokenizer),
        config.seed,
        f"routers {folder.name}",
        progress,
        trainable=lambda name: name in router_names,
    )
    return _saved(module, tokenizer, out, {"stamp": stamp, **report})


def permuted_experts(folder: Path, out: Path, zoo: LLMZoo, seed: int) -> Path:
    """The MoE of ``folder`` with every expert's FFN units in its own seeded random order (gate and up rows, down
    columns together): the same function, but experts no longer unit-aligned — what experts that do not share an
    initialisation look like to a merge (fine-tunes of one base are aligned already)."""
    stamp = {"model": model_stamp(folder), "permuted": seed}
    if _built(out, stamp):
        return out
    module = load_causal_lm(folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, experts in expert_modules(module):
            for e in range(experts.gate_up_proj.shape[0]):
                order = torch.randperm(experts.down_proj.shape[-1], generator=generator)
                gate_up, down = permute_expert(experts.gate_up_proj[e], experts.down_proj[e], order)
                experts.gate_up_proj[e] = gate_up
                experts.down_proj[e] = down
    return _saved(module, zoo.tokenizer(), out, {"stamp": stamp})


def run_moe_bench(
    zoo_root: Path, out: Path, config: MoEBenchConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Every row of the module docstring; returns (and writes) the results."""
    config = config or MoEBenchConfig()
    zoo = LLMZoo(zoo_root)
    if config.skills and tuple(zoo.skills) != tuple(config.skills):
        raise MergeError(
            f"{zoo.root}: the zoo holds the skills {', '.join(zoo.skills)}, the MoE bench wants "
            f"{', '.join(config.skills)}; build it with them (mergesmith bench --zoo moe does)"
        )
    work = zoo.root / "moe"
    cache = out / "runs" / "moe"
    cache.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    folders: dict[str, Path] = {}
    started = time.perf_counter()

    def scored(name: str, folder: Path, **extra: Any) -> None:
        folders[name] = folder
        key = {"model": model_stamp(folder), "limit": config.eval_limit, **extra}
        path = cache / f"{name.replace(':', '-').replace('@', '-')}.json"
        rows[name] = keyed_json(path, key, lambda: evaluated(folder, extra), field="row")

    def evaluated(folder: Path, extra: dict[str, Any]) -> dict[str, Any]:
        module = load_causal_lm(folder)
        row: dict[str, Any] = {}
        if "top_p" in extra:
            with top_p_routing(module, extra["top_p"]) as routing:
                row["skills"] = zoo.evaluate(module, limit=config.eval_limit)
                row["experts_per_token"] = routing.report().mean
        else:
            if extra.get("top_k"):
                for _, router in routers(module):
                    router.top_k = extra["top_k"]
            row["skills"] = zoo.evaluate(module, limit=config.eval_limit)
        manifest = folder / "manifest.json"
        record = json.loads(manifest.read_text()) if manifest.exists() else {}
        for key_name in ("moe_merge", "moe_compress"):
            if key_name in record:
                row[key_name] = {
                    k: record[key_name][k]
                    for k in record[key_name]
                    if k not in ("labels", "usage_frequency", "centers")
                }
        return row

    # the dense experts on the same prompts (their reference evaluations: cached by the zoo)
    dense = reference_evaluations(zoo, [f"expert:{s}" for s in zoo.skills], config.eval_limit, progress)
    rows.update({row: {"skills": scores} for row, scores in dense.items()})
    folders.update({f"expert:{s}": zoo.expert(s) for s in zoo.skills})
    steps = [("gate", g) for g in config.gate_modes]
    for _, gate in tqdm(steps, desc="gate modes", disable=not progress, leave=False):
        upcycled = _written(
            build_moe,
            moe_config(zoo, gate, config),
            work / f"upcycled-{gate}",
            [zoo.model_stamp(m) for m in (zoo.base, *map(zoo.expert, zoo.skills))],
            force=True,
            progress=False,
        )
        scored(f"upcycled:{gate}", upcycled)
        routed = train_routers(upcycled, work / f"routed-{gate}", zoo, config, progress)
        scored(f"routed:{gate}", routed)
    main = work / f"routed-{config.gate_modes[0]}"
    calibration = calibration_file(zoo, work / "calibration.jsonl", config.calibration)
    experts = len(zoo.skills)
    first_merge: Path | None = None

    def merged(source: Path, method: str, groups: int, folder: Path) -> Path:
        return _written(
            merge_moe_experts,
            source,
            folder,
            model_stamp(source),
            data=calibration,
            groups=groups,
            method=method,
            seed=config.seed,
            force=True,
            progress=False,
        )

    for fraction in config.group_fractions:
        groups = max(1, round(experts * fraction))
        for method in MERGE_METHODS:
            folder = merged(main, method, groups, work / f"{method}-g{groups}")
            scored(f"{method}@{groups}", folder)
            if first_merge is None and method == "m-smoe":
                first_merge = folder
    assert first_merge is not None
    # the alignment step where it has work to do: the same experts with their units shuffled, merged with and
    # without it at the first group count
    permuted = permuted_experts(main, work / f"{main.name}-permuted", zoo, config.seed)
    scored(f"permuted:{config.gate_modes[0]}", permuted)
    groups = max(1, round(experts * config.group_fractions[0]))
    for method in ("m-smoe", "m-smoe-no-align"):
        scored(
            f"{method}@{groups}:permuted",
            merged(permuted, method, groups, work / f"{method}-g{groups}-permuted"),
        )
    for rank, remaining, steps in config.compress:
        tuned = f"-ft{steps}" if steps else ""
        folder = _written(
            compress_moe,
            first_merge,
            work / f"compressed-r{rank}-p{remaining}{tuned}",
            model_stamp(first_merge),
            rank=rank,
            remaining=remaining,
            data=calibration if steps else None,
            steps=steps,
            seed=config.seed,
            force=True,
            progress=progress,
        )
        scored(f"compressed:r{rank}-{remaining}{tuned}", folder)
    scored("top-1", main, top_k=1)
    for p in config.top_p:
        scored(f"top-p:{p}", main, top_p=p)
    results = _summarise(zoo, rows, folders, main, config, time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "moe.md").write_text(markdown(results))
    plot(results, out / "moe.png")
    return results


def _summarise(
    zoo: LLMZoo,
    rows: dict[str, dict[str, Any]],
    folders: Mapping[str, Path],
    main: Path,
    config: MoEBenchConfig,
    seconds: float,
) -> dict[str, Any]:
    full = parameter_counts(main)
    experts = {s: rows[f"expert:{s}"]["skills"][s]["exact_match"] for s in zoo.skills}
    table = {}
    for name, row in rows.items():
        skills = row["skills"]
        table[name] = {
            "exact_match": {s: skills[s]["exact_match"] for s in zoo.skills},
            "loss": {s: skills[s]["loss"] for s in zoo.skills},
            "mean_loss": sum(skills[s]["loss"] for s in zoo.skills) / len(zoo.skills),
            "normalized": normalized_exact_match(skills, experts),
            "parameters": parameter_counts(folders[name]),
            **{k: v for k, v in row.items() if k != "skills"},
        }
    return {
        "name": "moe",
        "command": "mergesmith bench --zoo moe",
        "zoo": str(zoo.root),
        "skills": list(zoo.skills),
        "config": dataclasses.asdict(config),
        "seconds": round(seconds, 1),
        "upcycled_parameters": full,
        "rows": table,
    }


def markdown(results: Mapping[str, Any]) -> str:
    skills = results["skills"]
    full = results["upcycled_parameters"]
    head = (
        "| row | "
        + " | ".join(skills)
        + " | mean loss | normalized % [95 % CI] | parameters M (experts' % of the "
        "MoE's) | notes |"
    )
    lines = [
        f"# MoE benchmark\n\n`{results['command']}`; exact match % (answer loss) on the first "
        f"{results['config']['eval_limit']} test prompts per skill; normalized = exact match over each skill's "
        f"own expert's, averaged over the skills; parameters as stored (a compressed model's experts by their "
        f"factors); the upcycled MoE holds {full['model'] / 1e6:.1f} M, {full['experts'] / 1e6:.1f} M in experts.\n",
        head,
        "|---|" + "---|" * (len(skills) + 4),
    ]
    for name, row in results["rows"].items():
        cells = [f"{100 * row['exact_match'][s]:.0f} ({row['loss'][s]:.2f})" for s in skills]
        norm = row["normalized"]
        ci = (
            f"{100 * norm['estimate']:.1f} [{100 * norm['low']:.1f}, {100 * norm['high']:.1f}]"
            if norm
            else "–"
        )
        params = row["parameters"]
        share = f"{100 * params['experts'] / full['experts']:.0f} %" if params["experts"] else "dense"
        size = f"{params['model'] / 1e6:.1f} ({share})"
        notes = []
        if "experts_per_token" in row:
            notes.append(f"{row['experts_per_token']:.2f} experts/token")
        if "moe_merge" in row:
            notes.append(f"experts per layer: {row['moe_merge']['groups_per_layer'][0]}")
        if "moe_compress" in row:
            c = row["moe_compress"]
            tuned = f", pruned while distilling {c['steps']} steps" if c["steps"] else ", one-shot"
            notes.append(f"rank {c['rank']}, sparse part: {100 * c['remaining']:.0f} % of its rows{tuned}")
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {row['mean_loss']:.3f} | {ci} | {size} | {'; '.join(notes)} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> Path:
    """Mean answer loss against experts per token (top-p, top-1, top-2) and against the parameters stored (the
    routed MoE, its merged and compressed versions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    routed = f"routed:{results['config']['gate_modes'][0]}"
    points = [
        (rows[n]["experts_per_token"], rows[n]["mean_loss"], n)
        for n in rows
        if "experts_per_token" in rows[n]
    ]
    fixed = [(k, rows[n]["mean_loss"], n) for k, n in ((1, "top-1"), (2, routed)) if n in rows]
    if points:
        left.plot([p[0] for p in points], [p[1] for p in points], "o-", label="top-p")
    for k, loss, name in fixed:
        left.plot([k], [loss], "s", label=name)
    left.set_xlabel("experts per token")
    left.set_ylabel("mean answer loss")
    left.legend(fontsize=7)
    # one series per way of shrinking (a merge method over its expert counts, compression one-shot / distilled);
    # log loss: the broken rows (loss > 10) would flatten the others onto the axis
    series: dict[str, list[tuple[float, float, str]]] = {}
    for name, row in rows.items():
        if name == routed:
            kind, label = "routed MoE", ""
        elif row.get("moe_compress"):
            kind = "compressed, distilled" if row["moe_compress"].get("steps") else "compressed, one-shot"
            label = f"r{row['moe_compress']['rank']}/{100 * row['moe_compress']['remaining']:.0f}%"
        elif row.get("moe_merge"):
            kind, label = name.split("@")[0] + (" (shuffled experts)" if "permuted" in name else ""), ""
        else:
            continue
        series.setdefault(kind, []).append((row["parameters"]["model"] / 1e6, row["mean_loss"], label))
    for kind, pts in series.items():
        pts.sort()
        right.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind, markersize=4)
        for x, loss, label in pts:
            if label:
                right.annotate(label, (x, loss), fontsize=6, xytext=(3, 3), textcoords="offset points")
    right.set_yscale("log")
    right.set_xlabel("parameters stored (M)")
    right.set_ylabel("mean answer loss (log)")
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
