"""``mergesmith`` command line: ``merge`` and ``methods``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import signal
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergesmith.dtypes import DTYPE_NAMES
from mergesmith.errors import MergeError


def _terminate(signum, frame):  # SIGTERM behaves like Ctrl-C: unwind, remove the temporary output
    raise KeyboardInterrupt


def cmd_merge(args: argparse.Namespace) -> int:
    from mergesmith.api import merge

    result = merge(
        args.recipe,
        args.out,
        force=args.force,
        shard_size=args.shard_size,
        threads=args.threads,
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
        resume=args.resume,
        seed=args.seed,
        dtype=args.dtype,
        compat=args.compat,
        progress=not args.quiet,
        device=args.device,
    )
    print(result.summary())
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from mergesmith.methods.base import REQUIRED
    from mergesmith.methods.registry import all_methods, get_method

    if args.name:
        m = get_method(args.name)
        print(f"{m.name}: {m.summary}")
        print(f"  paper: {m.paper}")
        print(
            f"  base_model: {m.base.value}; models: >= {m.min_experts}"
            + (f", <= {m.max_experts}" if m.max_experts else "")
        )
        if m.fit is not None:
            print(
                f"  data: {m.fit.data.value} examples per model (`data:` in the recipe; `fitted:` replays a fit)"
            )
        print("  parameters:")
        for p in m.params:
            default = "required" if p.required else repr(p.default)
            mk = (
                f" (compat mergekit: {p.mergekit!r})"
                if p.mergekit is not REQUIRED and p.mergekit != p.default
                else ""
            )
            scope = "per model" if p.per_model else "shared"
            choices = f" {{{', '.join(map(str, p.choices))}}}" if p.choices else ""
            print(f"    {p.name} ({p.type.__name__}, {scope}) = {default}{mk}{choices}")
            if p.help:
                print(textwrap.indent(textwrap.fill(p.help, 96), "        "))
        if m.aliases:
            print("  mergekit spellings: " + ", ".join(f"{k} -> {v[0]}" for k, v in m.aliases.items()))
        doc = sys.modules[m.rule.fn.__module__].__doc__ or ""
        if doc:
            print()
            print(textwrap.indent(doc.strip(), "  "))
        return 0
    if args.markdown:
        print(methods_markdown())
        return 0
    for m in all_methods():
        print(
            f"{m.name:<18} {m.summary}" + (f" [needs {m.fit.data.value} data]" if m.fit is not None else "")
        )
        print(f"{'':<18} {m.paper}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from mergesmith.io.output import verify

    problems = verify(args.out)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"{args.out}: {len(problems)} problem(s)")
        return 1
    print(f"{args.out}: OK (every shard matches its recorded sha256)")
    return 0


def cmd_multi(args: argparse.Namespace) -> int:
    from mergesmith.api.multi import run_multi

    run_multi(
        args.config,
        args.intermediate_dir,
        args.out,
        lazy=not args.no_lazy,
        shard_size=args.shard_size,
        threads=args.threads,
        allow_pickle=args.allow_pickle,
        compat=args.compat,
        progress=not args.quiet,
        device=args.device,
    )
    return 0


def cmd_merge_adapters(args: argparse.Namespace) -> int:
    from mergesmith.api.merge_adapters import merge_adapters

    config = merge_adapters(
        args.adapters,
        args.out,
        weights=args.weights,
        combination=args.combination,
        rank=args.rank,
        density=args.density,
        majority_sign=args.majority_sign,
        seed=args.seed,
        force=args.force,
    )
    print(f"merged {len(args.adapters)} adapters ({args.combination}, rank {config['r']}) -> {args.out}")
    return 0


def cmd_tokensurgeon(args: argparse.Namespace) -> int:
    from mergesmith.api.tokensurgeon import tokensurgeon

    result, plan = tokensurgeon(
        args.model, args.donor, args.out, k=args.k, force=args.force, progress=not args.quiet
    )
    print(f"{plan.exact} tokens kept, {plan.approximated} approximated (OMP, k={args.k}); {result.summary()}")
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from mergesmith.api.extract_lora import extract_lora

    report = extract_lora(
        args.base, args.finetuned, args.out, rank=args.rank, energy=args.energy, force=args.force
    )
    print(f"{report.summary()} -> {args.out} (per layer: {args.out}/extraction.json)")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    import json

    from mergesmith.api.align import align

    result = align(
        args.reference,
        args.model,
        args.out,
        method=args.method,
        data=args.data,
        seed=args.seed,
        residual=not args.no_residual,
        max_iter=args.max_iter,
        force=args.force,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    summary = json.loads((result.out_dir / "manifest.json").read_text())["alignment"]
    info = next(iter(summary["models"].values()))
    print(
        f"aligned {args.model} to {args.reference}: {info['units_moved']} units moved in "
        f"{len(summary['groups'])} groups, {info['sweeps']} sweeps, {info['seconds']:.1f} s; distance "
        f"{info['distance_before']:.4g} -> {info['distance_after']:.4g} -> {result.out_dir}"
    )
    return 0


def cmd_moe(args: argparse.Namespace) -> int:
    from mergesmith.api.moe import build_moe

    result = build_moe(
        args.config,
        args.out,
        allow_all_same=args.i_understand_this_is_not_useful_without_training,
        force=args.force,
        allow_pickle=args.allow_pickle,
        progress=not args.quiet,
    )
    print(
        f"moe: {result.tensors} tensors, {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s -> {result.out_dir}"
    )
    return 0


def cmd_moe_inspect(args: argparse.Namespace) -> int:
    from mergesmith.api.moe_inspect import heatmap, inspect_moe, table, write_report

    stats = inspect_moe(args.model, args.data, limit=args.limit, max_length=args.max_length)
    print(table(stats), end="")
    if args.json:
        print(f"statistics -> {write_report(stats, args.json)}")
    if args.png:
        print(f"heatmap -> {heatmap(stats, args.png)}")
    return 0


def cmd_moe_merge(args: argparse.Namespace) -> int:
    import json

    from mergesmith.api.moe_merge import merge_moe_experts

    result = merge_moe_experts(
        args.model,
        args.out,
        args.data,
        groups=args.groups,
        average_groups=args.average_groups,
        method=args.method,
        form=args.form,
        limit=args.limit,
        max_length=args.max_length,
        seed=args.seed,
        recover_steps=args.recover_steps,
        lr=args.lr,
        force=args.force,
        progress=not args.quiet,
    )
    record = json.loads((result.out_dir / "manifest.json").read_text())["moe_merge"]
    params = record["unique_expert_parameters"]
    print(
        f"moe merge ({record['method']}, {record['form']}): {record['experts_before']} -> groups per layer "
        f"{record['groups_per_layer']}, expert parameters {params['before']:,} -> {params['after']:,} -> {result.out_dir}"
    )
    return 0


def cmd_moe_compress(args: argparse.Namespace) -> int:
    import json

    from mergesmith.api.moe_compress import compress_moe

    result = compress_moe(
        args.model,
        args.out,
        rank=args.rank,
        remaining=args.remaining,
        data=args.data,
        steps=args.steps,
        lr=args.lr,
        limit=args.limit,
        max_length=args.max_length,
        seed=args.seed,
        force=args.force,
        progress=not args.quiet,
    )
    record = json.loads((result.out_dir / "manifest.json").read_text())["moe_compress"]
    dense, stored = record["expert_parameters_dense"], record["expert_parameters_stored"]
    print(
        f"moe compress: expert parameters {dense:,} -> {stored:,} ({100 * stored / dense:.1f} %) -> {result.out_dir}"
    )
    return 0


MOE_KEYS = """`mergesmith moe inspect MODEL --data FILE [--png P] [--json J]` prints how an MoE routes a text file.
`mergesmith moe merge MODEL OUT --data FILE --groups N` merges its experts (MC-SMoE; see its --help).
`mergesmith moe compress MODEL OUT --rank R --remaining P` makes them low-rank + sparse (see its --help).

config keys (mergekit-moe's, read as they are):
  base_model          the model every non-FFN tensor (attention, norms, embeddings, head) comes from
  experts             a list; each becomes one routed expert of every layer:
    source_model        the dense fine-tune whose FFN it is (a folder, a Hub id, BASE+LORA)
    positive_prompts    texts that should be routed to it (the prompt gate modes need them)
    negative_prompts    texts that should not (their vector is subtracted from the router row)
    noise_scale         Gaussian noise of this std added to its FFN weights (seeded per tensor)
    residual_scale      scales its down_proj: how much it adds to the residual stream
  gate_mode           how router rows are set: hidden (the base's hidden state at each prompt's last token,
                      per layer), hidden_avg (averaged over positions), hidden_last, cheap_embed (the prompts'
                      token embeddings), random (N(0,1)), uniform_random (nn.Linear's init); default hidden
  experts_per_token   k of top-k routing (default 2)
  shared_experts      Qwen2-MoE only: exactly one expert always active, with its own gate (same keys as experts)
  architecture        mixtral | qwen (Qwen2-MoE) | qwen3 (Qwen3-MoE); default: the first that hosts the models,
                      Mixtral first (Llama/Mistral experts), as mergekit-moe picks
  dtype               the output dtype (default: the base's)
mergesmith's own keys:
  seed                the random gate modes and the noise (default 0; mergekit's --random-seed draws the same gates)
  hidden_dtype        what the hidden modes run the base in: bfloat16 (mergekit's, default) or float32
"""


def cmd_continual(args: argparse.Namespace) -> int:
    from mergesmith.drivers.continual import add_model, export_state, init_state

    if args.action == "init":
        params = {
            k: v
            for k, v in (("alpha", args.alpha), ("lambda", args.lam), ("density", args.density))
            if v is not None
        }
        state = init_state(args.first, args.second, args.method, params)
        print(f"continual state ({state.method}, {state.params}) of base {args.first} -> {args.second}")
    elif args.action == "add":
        state = add_model(args.first, args.second)
        seconds = state.history[-1]["seconds"]
        print(f"added {args.second} to {args.first}: {state.count} models, {seconds:.1f} s")
    else:
        result = export_state(args.first, args.second, force=args.force, progress=not args.quiet)
        print(f"exported the running merge -> {result.out_dir}")
    return 0


def cmd_evolve(args: argparse.Namespace) -> int:
    from mergesmith.bench.zoo.evolve_fitness import BENCH_KINDS
    from mergesmith.drivers.evolve.search import evolve

    result = evolve(
        args.search,
        args.out,
        resume=args.resume,
        budget=args.budget,
        workers=args.workers,
        threads=args.threads,
        ray=not args.no_ray,
        address=args.address,
        extra_kinds=BENCH_KINDS,
        progress=not args.quiet,
        write_model=not args.no_model,
    )
    print(
        f"best fitness {result.best_fitness:.4f} after {result.evaluations} evaluations in {result.generations} "
        f"generations ({result.candidates_per_minute:.1f} candidates/min, {result.seconds:.0f} s) -> "
        f"{result.out}/best_recipe.yaml"
    )
    return 0


def cmd_pleas(args: argparse.Namespace) -> int:
    from mergesmith.api.pleas import pleas

    result = pleas(
        args.model_a,
        args.model_b,
        args.out,
        budget=args.budget,
        data=args.data,
        method=args.method,
        seed=args.seed,
        force=args.force,
        progress=not args.quiet,
    )
    print(result.summary())
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    import json

    from mergesmith.api.gguf import RECORD, convert_gguf

    out = convert_gguf(args.gguf, args.out, force=args.force, dtype=args.dtype)
    record = json.loads((out / RECORD).read_text())
    types = ", ".join(f"{n} {t}" for t, n in record["source"]["tensor_types"].items())
    print(
        f"{record['source']['architecture']} GGUF ({types} tensors) -> {out}: "
        f"{record['output']['parameters']:,} parameters in {record['output']['dtype']}"
        + (" (dequantized: the weights carry the GGUF's quantization error)" if record["dequantized"] else "")
    )
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.zoo == "llm":
        return _llm_zoo(args)
    if args.zoo == "scratch":
        return _scratch_zoo(args)
    from mergesmith.bench.zoo.text8 import Zoo, build_zoo

    if args.action != "build":
        raise MergeError("lm-eval export is for the llm zoo: mergesmith zoo lm-eval llm --out DIR")
    root = build_zoo(
        tasks=args.tasks, quick=args.quick, rebuild=args.rebuild, multitask=not args.no_multitask
    )
    zoo = Zoo(root)
    print(f"zoo ready: {root}")
    print(_accuracy_table(zoo))
    return 0


def _llm_zoo(args: argparse.Namespace) -> int:
    import dataclasses

    from mergesmith.bench.zoo.llm import LLMZoo, LLMZooConfig, build_llm_zoo, reference_table
    from mergesmith.bench.zoo.lm_eval_tasks import write_lm_eval_tasks

    if args.action == "lm-eval":
        if args.out is None:
            raise MergeError("zoo lm-eval llm needs --out DIR (the task folder to write)")
        from mergesmith.io.cache import zoo_dir

        folder = write_lm_eval_tasks(LLMZoo(zoo_dir("llm-quick" if args.quick else "llm")), Path(args.out))
        print(f"lm-eval tasks written: lm_eval --include_path {folder} --tasks mergesmith_llm --model hf ...")
        return 0
    config = LLMZooConfig.quick() if args.quick else LLMZooConfig()
    if args.tasks:
        config = dataclasses.replace(config, skills=tuple(args.tasks))
    root = build_llm_zoo(quick=args.quick, config=config)
    print(f"zoo ready: {root}")
    print(reference_table(LLMZoo(root)))
    return 0


def _scratch_zoo(args: argparse.Namespace) -> int:
    from mergesmith.bench.zoo.scratch import ScratchZoo, build_scratch_zoo, summary

    if args.action != "build":
        raise MergeError("lm-eval export is for the llm zoo: mergesmith zoo lm-eval llm --out DIR")
    for flag, given in (
        ("--tasks", args.tasks),
        ("--rebuild", args.rebuild),
        ("--no-multitask", args.no_multitask),
    ):
        if given:  # the scratch zoo rebuilds exactly the models whose inputs changed
            raise MergeError(
                f"{flag} goes with the text8 and llm zoos; `zoo build scratch` takes only --quick"
            )
    root = build_scratch_zoo(quick=args.quick)
    print(f"zoo ready: {root}")
    print(summary(ScratchZoo(root)))
    return 0


def _accuracy_table(zoo) -> str:
    acc = zoo.manifest["accuracy"]
    lines = [f"{'task':<16} {'zero-shot':>9} {'fine-tuned':>10} {'multi-task':>10}   (test accuracy, %)"]
    for t in zoo.tasks:
        cells = [acc[k].get(t, {}).get("test") for k in ("zeroshot", "finetuned", "multitask")]
        lines.append(
            f"{t:<16} " + " ".join(f"{100 * c:>9.1f} " if c is not None else f"{'—':>10}" for c in cells)
        )
    return "\n".join(lines)


EVAL_OPTIONS = {  # the options of each generic evaluation mode (others are refused in that mode)
    "classification": {"head", "pooling", "text_column", "label_column", "max_length", "tokenizer"},
    "perplexity": {"max_length", "tokenizer"},
    "exact-match": {"prompt_column", "answer_column", "max_new_tokens", "keep_newlines", "tokenizer"},
}
EVAL_DEFAULTS = {
    "head": None,
    "pooling": None,
    "text_column": "text",
    "label_column": "label",
    "max_length": None,
    "tokenizer": None,
    "prompt_column": "prompt",
    "answer_column": "answer",
    "max_new_tokens": None,
    "keep_newlines": False,
}


BENCH_OUT_DEFAULT = "bench/results"
ZOO_STEP_SCALE = 0.02  # the committed data rows' schedules: 2 % of the papers' steps (CPU budget)


def cmd_eval(args: argparse.Namespace) -> int:
    """``mergesmith eval``: a zoo's per-task accuracy (``--zoo``, the default mode) or one task's metrics
    (``--task`` with ``--data``), as a table or, with ``--json``, as JSON."""
    import json

    if args.batch_size is not None and args.batch_size < 1:
        raise MergeError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.bench is not None:
        if args.task is not None or args.zoo is not None or args.data is not None:
            raise MergeError("a BENCH.yaml brings its own tasks and data: drop --task, --zoo and --data")
        return _eval_suite(args)
    if args.task is None:
        return _eval_zoo(args)
    if args.zoo is not None or args.quick or args.split is not None:
        raise MergeError("--zoo, --quick and --split go with a zoo evaluation; with --task give --data FILE")
    if args.data is None:
        raise MergeError(f"--task {args.task} needs --data FILE")
    stray = [
        k
        for k, default in EVAL_DEFAULTS.items()
        if k not in EVAL_OPTIONS[args.task] and getattr(args, k) != default
    ]
    if stray:
        raise MergeError(f"--{stray[0].replace('_', '-')} does not apply to --task {args.task}")
    metrics = _eval_task(args)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"{args.task} of {args.model} on {args.data}")
    for name, value in metrics.items():
        shown = f"{value:d}" if isinstance(value, int) else f"{value:.4f}"
        print(f"  {name:<12} {shown:>12}")
    return 0


def _eval_task(args: argparse.Namespace) -> dict[str, float]:
    """Load the task of ``--task`` on ``--data`` and the model, and evaluate."""
    from mergesmith.fit import evaluate as ev

    task: ev.EvalTask
    if args.task == "classification":
        task, model = ev.load_classification(
            args.model,
            args.data,
            head=args.head,
            pooling=args.pooling,
            text_column=args.text_column,
            label_column=args.label_column,
            tokenizer=args.tokenizer,
            max_length=ev.MAX_LENGTH if args.max_length is None else args.max_length,
        )
    elif args.task == "perplexity":
        task, model = ev.load_perplexity(
            args.model, args.data, max_length=args.max_length, tokenizer=args.tokenizer
        )
    else:
        task, model = ev.load_exact_match(
            args.model,
            args.data,
            prompt_column=args.prompt_column,
            answer_column=args.answer_column,
            max_new_tokens=ev.MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens,
            stop_at_newline=not args.keep_newlines,
            tokenizer=args.tokenizer,
        )
    return task.evaluate(model, batch_size=args.batch_size, progress=not args.json)


def _eval_zoo(args: argparse.Namespace) -> int:
    """Zoo mode: the per-task, average and normalized accuracy of an encoder on a zoo's split."""
    import json

    from mergesmith.bench.zoo.text8 import Zoo, summarize, zoo_dir

    given = [k for k, default in EVAL_DEFAULTS.items() if getattr(args, k) != default]
    if args.data is not None or given:
        flag = "--data" if args.data is not None else f"--{given[0].replace('_', '-')}"
        raise MergeError(
            f"{flag} goes with --task (classification, perplexity or exact-match); a zoo "
            "evaluation reads the zoo's own test data"
        )
    split = args.split or "test"
    zoo = Zoo(zoo_dir(args.zoo or "text8", args.quick))
    acc = zoo.evaluate(
        args.model,
        split,
        progress=not args.json,
        **({"batch_size": args.batch_size} if args.batch_size is not None else {}),
    )
    finetuned = zoo.finetuned_accuracy(split)
    s = summarize(acc, finetuned)
    if args.json:
        print(json.dumps({"accuracy": acc, "finetuned": finetuned, **s}, indent=2))
        return 0
    print(f"{'task':<16} {'accuracy':>8} {'fine-tuned':>10} {'normalized':>10}")
    for t, a in acc.items():
        print(f"{t:<16} {100 * a:>8.1f} {100 * finetuned[t]:>10.1f} {100 * a / finetuned[t]:>10.1f}")
    print(f"{'average':<16} {100 * s['average']:>8.1f} {'':>10} {100 * s['normalized']:>10.1f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from mergesmith.bench.zoo.bench import markdown_table, run_bench, write_reports
    from mergesmith.bench.zoo.text8 import Zoo, build_zoo

    if args.bench_file is not None:
        return _bench_suite(args)
    if args.zoo == "continual":  # the text8 experts arriving one at a time (OPCM and the continual baselines)
        from mergesmith.bench.zoo.continual_bench import ContinualBenchConfig, markdown, run_continual_bench
        from mergesmith.bench.zoo.text8 import build_zoo

        zoo_root = build_zoo(quick=args.quick)
        config = ContinualBenchConfig(orders=2, alphas=(0.5,), eval_limit=50) if args.quick else None
        print(markdown(run_continual_bench(zoo_root, Path(args.out), config)))
        return 0
    if args.zoo == "moe":  # the LLM zoo's experts as an MoE: gates, routers, MC-SMoE, compression, top-p
        from mergesmith.bench.zoo.llm import LLMZooConfig, build_llm_zoo
        from mergesmith.bench.zoo.moe_bench import MoEBenchConfig, markdown, run_moe_bench

        config = MoEBenchConfig.quick() if args.quick else MoEBenchConfig()
        # the base and the bench's experts only: it scores its own rows (the experts' on its prompts)
        zoo_config = LLMZooConfig.quick() if args.quick else LLMZooConfig()
        if config.skills:
            zoo_config = dataclasses.replace(zoo_config, skills=config.skills)
        zoo_root = build_llm_zoo(quick=args.quick, config=zoo_config, multitask=False, scores=False)
        print(markdown(run_moe_bench(zoo_root, Path(args.out), config)))
        return 0
    if args.zoo == "scratch":  # models of different initializations: alignment, PLeaS (its own tables)
        from mergesmith.bench.zoo.align_bench import markdown as align_markdown
        from mergesmith.bench.zoo.align_bench import run_align_bench

        results = run_align_bench(quick=args.quick, out=Path(args.out))
        print(align_markdown(results))
        return 0
    if args.zoo == "llm":  # the LLM zoo is a BENCH.yaml suite: its results go to <out>/llm.*
        from mergesmith.bench.zoo.llm import LLMZoo, build_llm_zoo, multitask_outcomes

        if args.checks or args.report:
            raise MergeError("--checks and --report go with the text8 zoo; the llm zoo takes --data")
        root = build_llm_zoo(quick=args.quick)
        args.bench_file = str(root / "BENCH.yaml")
        args.name = args.name or ("llm-quick" if args.quick else "llm")
        args.quick = False
        # the multi-task fine-tune as a reference row, from the hits the zoo's build keeps
        multitask = multitask_outcomes(LLMZoo(root))
        return _bench_suite(args, out=Path(args.out), references={"multitask": multitask})
    args.seeds = 3 if args.seeds is None else args.seeds

    if args.report:  # only join finished runs and write the reports
        from mergesmith.bench.zoo.bench import combine

        results = combine([json.loads(Path(p).read_text()) for p in args.report])
        paths = write_reports(results, Path(args.out), args.name or args.zoo)
        print(markdown_table(results))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    zoo = Zoo(build_zoo(quick=args.quick, multitask=not args.data))
    name = args.name or (f"{args.zoo}-quick" if args.quick else args.zoo)
    if args.data:  # the data-driven methods and the backdoor scenario, added to an existing <name>.json
        from mergesmith.bench.zoo import databench

        target = Path(args.out) / f"{name}.json"
        if not target.exists():
            raise MergeError(
                f"{target}: run the data-free benchmark first (`mergesmith bench`); the data-driven "
                "rows are added to its results"
            )
        runs = Path(args.out) / "runs"
        if args.checks:  # rerun rows with the benchmark's CPU compromises undone, beside the committed rows
            stored = json.loads(target.read_text())
            if "data_methods" not in stored:
                raise MergeError(
                    f"{target}: run `mergesmith bench --data` first; the checks compare with its rows"
                )
            checks = databench.run_checks(
                zoo, runs, only=args.methods, row_step_scale=stored["data_methods"]["step_scale"]
            )
            databench.attach(target, None, None, checks)
            print(databench.checks_markdown(checks, stored["data_methods"]))
            return 0
        data = databench.run_data_bench(
            zoo,
            seeds=args.seeds,
            step_scale=ZOO_STEP_SCALE if args.step_scale is None else args.step_scale,
            only=args.methods,
            checkpoint=runs / f"{name}-data.json",
            search=not args.no_search,
        )
        backdoor = None
        if not args.no_backdoor:
            backdoor = databench.run_backdoor_bench(
                zoo,
                seeds=args.seeds,
                step_scale=ZOO_STEP_SCALE if args.step_scale is None else args.step_scale,
                checkpoint=runs / f"{name}-backdoor.json",
                chosen=databench.validation_choices(data),
            )
        databench.attach(target, data, backdoor)
        print(databench.data_markdown(data))
        if backdoor is not None:
            print(databench.backdoor_markdown(backdoor))
        return 0
    results = run_bench(
        zoo,
        methods=args.methods,
        seeds=args.seeds,
        val_limit=args.val_limit,
        checkpoint=Path(args.out) / f"{name}.partial.json",
        search=not args.no_search,
    )
    results["command"] = args.command_line
    paths = write_reports(results, Path(args.out), name)
    (Path(args.out) / f"{name}.partial.json").unlink(missing_ok=True)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _bench_suite(
    args: argparse.Namespace, out: Path | None = None, references: Mapping[str, Any] | None = None
) -> int:
    """``mergesmith bench BENCH.yaml``: the data-free benchmark on the user's own base and experts (``--data``:
    the data-driven rows, added to its results); finished rows are kept in <out>/runs/ so that a stopped run
    resumes. ``references``: extra reference rows' test outcomes (:meth:`Suite.add_reference`)."""
    import json
    from pathlib import Path

    from mergesmith.bench.suite import Suite, check_methods
    from mergesmith.bench.zoo.bench import ROWS, markdown_table, run_bench, write_reports

    if args.checks or args.report or args.quick:
        raise MergeError("--checks, --report and --quick go with the built-in zoo, not a BENCH.yaml")
    suite = Suite(args.bench_file)
    for reference, outcomes in (references or {}).items():
        suite.add_reference(reference, outcomes)
    if out is None:
        out = Path(args.out) if args.out != BENCH_OUT_DEFAULT else suite.out
    name = args.name or suite.name
    seeds = args.seeds or suite.spec.seeds
    if args.data:
        from mergesmith.bench.zoo import databench

        known = {r.key: r for r in databench.rows()}
        check_methods(suite.spec.data_methods, known, suite.path)
        check_methods(args.methods, known, suite.path)
        only = args.methods or suite.spec.data_methods
        chosen = [r for r in known.values() if only is None or r.key in only]
        suite.check_data_rows(sorted({r.split for r in chosen}), sorted({r.method for r in chosen}))
        target = out / f"{name}.json"
        if not target.exists():
            raise MergeError(
                f"{target}: run `mergesmith bench {args.bench_file}` first; the data-driven rows are added to "
                "its results"
            )
        stored = json.loads(target.read_text())
        if stored.get("config") != suite.identity:
            raise MergeError(
                f"{target}: made from another version of {suite.path} (its files or models changed); rerun "
                f"`mergesmith bench {args.bench_file}` first"
            )
        step_scale = args.step_scale or suite.spec.step_scale or 1.0
        data = databench.run_data_bench(
            suite,
            seeds=seeds,
            step_scale=step_scale,
            only=only,
            checkpoint=out / "runs" / f"{name}-data.json",
            search=not args.no_search,
        )
        databench.attach(target, data, None)
        print(databench.data_markdown(data))
        return 0
    check_methods(suite.spec.methods, ROWS, suite.path)
    check_methods(args.methods, ROWS, suite.path)
    methods = args.methods or suite.spec.methods
    results = run_bench(
        suite,
        methods=methods,
        seeds=seeds,
        val_limit=args.val_limit or suite.spec.val_limit,
        checkpoint=out / "runs" / f"{name}.partial.json",
        search=not args.no_search,
    )
    results["command"] = args.command_line
    paths = write_reports(results, out, name)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _eval_suite(args: argparse.Namespace) -> int:
    """``mergesmith eval MODEL BENCH.yaml``: one model (e.g. a merge) on every task of a BENCH.yaml, each task
    with its own head, normalized by the experts, with the 95 % interval."""
    import json
    import math

    from mergesmith.bench.confidence import bootstrap_normalized
    from mergesmith.bench.suite import Suite, backbone, folder_tensors
    from mergesmith.bench.zoo.bench import accuracies, reference_rows
    from mergesmith.bench.zoo.text8 import summarize
    from mergesmith.fit.evaluate import model_folder

    suite = Suite(args.bench, progress=not args.json)
    folder = model_folder(args.model)
    state = backbone(folder_tensors(folder), suite.arch_prefix)
    missing = [n for n in suite.base_state() if n not in state]
    if missing:
        raise MergeError(
            f"{folder}: no '{missing[0]}' ({len(missing)} backbone tensors missing); give a merge of "
            f"this benchmark's experts"
        )
    reference = reference_rows(suite)
    finetuned = reference["finetuned"]["accuracy"]
    outcomes = suite.outcomes(state, "test")
    values = accuracies(outcomes)
    summary = summarize(values, finetuned, suite.kinds)
    ci = bootstrap_normalized(outcomes, finetuned, kinds=suite.kinds)
    if args.json:
        print(json.dumps({"values": values, "finetuned": finetuned, **summary, "ci": ci.as_dict()}, indent=2))
        return 0

    def shown(value: float, kind: str) -> str:
        return f"ppl {math.exp(value):.2f}" if kind == "loss" else f"{100 * value:.1f}"

    print(f"{'task':<16} {'score':>10} {'fine-tuned':>12} {'normalized':>10}")
    for t, v in values.items():
        kind = suite.kinds[t]
        norm = summarize({t: v}, {t: finetuned[t]}, {t: kind})["normalized"]
        print(f"{t:<16} {shown(v, kind):>10} {shown(finetuned[t], kind):>12} {100 * norm:>10.1f}")
    print(
        f"normalized average {100 * ci.estimate:.1f} (95 % CI {100 * ci.low:.1f}-{100 * ci.high:.1f}; "
        f"the experts = 100, the base = {100 * reference['zeroshot']['normalized']:.1f})"
    )
    return 0


def methods_markdown(full: bool = True) -> str:
    """Two Markdown tables generated from the registry: the methods (``full``: with every parameter and its
    default, and the paper; else what each does, as in the README), and every paper-vs-mergekit difference."""
    from mergesmith.methods.base import REQUIRED
    from mergesmith.methods.registry import all_methods

    if full:
        rows = ["| method | base | data | parameters (default) | paper |", "|---|---|---|---|---|"]
    else:
        rows = ["| method | base | data | what it does |", "|---|---|---|---|"]
    diffs = ["| method | parameter: paper default → `compat: mergekit` |", "|---|---|"]
    for m in all_methods():
        params = ", ".join(
            f"`{p.name}`{'*' if p.per_model else ''}={'required' if p.required else p.default!r}"
            for p in m.params
        )
        data = m.fit.data.value if m.fit is not None else "—"
        last = f"{params} | {m.paper}" if full else m.summary
        rows.append(f"| `{m.name}` | {m.base.value} | {data} | {last} |")
        differ = [
            f"`{p.name}` {p.default} → {p.mergekit}"
            for p in m.params
            if p.mergekit is not REQUIRED and p.mergekit != p.default
        ]
        if differ:
            diffs.append(f"| `{m.name}` | {'; '.join(differ)} |")
    note = (
        "`*` = per-model parameter; data: what a data-driven method fits on (`data:` in the recipe)."
        if full
        else "data: what a data-driven method fits on. Parameters, defaults and papers: `mergesmith methods "
        "NAME` and [docs/methods.md](docs/methods.md). Where the paper and mergekit differ:"
    )
    return "\n".join(rows) + "\n\n" + note + "\n\n" + "\n".join(diffs)


def add_device_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and mergekit's ``--cuda`` (the same as ``--device cuda``)."""
    p.add_argument(
        "--device",
        default=None,
        help="where the per-tensor arithmetic runs: cpu (default), cuda, cuda:N, mps, or auto (cuda if present)",
    )
    p.add_argument(
        "--cuda",
        dest="device",
        action="store_const",
        const="cuda",
        help="the same as --device cuda (mergekit)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergesmith", description="Merge neural-network checkpoints.")
    from mergesmith.version import __version__

    parser.add_argument("--version", action="version", version=f"mergesmith {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge the models a recipe names into an HF model folder")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument(
        "--threads", type=int, default=None, help="tensors merged in parallel (default: min(4, cores))"
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only=True)"
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="merge inputs that contain NaN or Inf")
    add_device_options(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted merge of the same recipe, reusing its verified finished shards",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--seed", type=int, default=None, help="seed for random methods (overrides the recipe)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPE_NAMES),
        help="output dtype (default: recipe out_dtype/dtype, else each tensor's base dtype)",
    )
    p.add_argument(
        "--compat",
        default=None,
        choices=["paper", "mergekit"],
        help="paper defaults (default) or mergekit's choices wherever they differ",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "multi", help="several merges that build on each other (mergekit-multi's file), in dependency order"
    )
    p.add_argument("config", help="YAML documents, each a recipe with name: (the final one may omit it)")
    p.add_argument("--intermediate-dir", "-I", required=True, help="where each named merge is written")
    p.add_argument("--out", default=None, help="the final (unnamed) merge's folder")
    p.add_argument("--no-lazy", action="store_true", help="redo every merge, even those up to date")
    p.add_argument("--shard-size", default="5GB", help="largest shard (default 5GB)")
    p.add_argument("--threads", type=int, default=None, help="tensors merged in parallel")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights")
    p.add_argument("--compat", default=None, choices=["paper", "mergekit"], help="as for merge")
    add_device_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_multi)

    p = sub.add_parser("verify", help="recheck an output folder against the sha256 in its manifest")
    p.add_argument("out")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "tokensurgeon", help="give a model another model's tokenizer (new rows by OMP over shared tokens)"
    )
    p.add_argument("model", help="the model whose weights are kept")
    p.add_argument("donor", help="the model whose tokenizer (and embedding geometry) is taken")
    p.add_argument("out", help="the output folder")
    p.add_argument(
        "--k", type=int, default=64, help="shared tokens per new token's approximation (default 64)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokensurgeon)

    p = sub.add_parser(
        "merge-adapters", help="several LoRA adapters of one base into one adapter (PEFT's combinations)"
    )
    p.add_argument("out", help="the adapter folder to write")
    p.add_argument("adapters", nargs="+", help="adapter folders or Hub ids")
    p.add_argument(
        "--weights", type=float, nargs="+", default=None, help="one weight per adapter (default 1)"
    )
    p.add_argument(
        "--combination",
        default="svd",
        help="cat | svd | linear | ties | ties_svd | dare_linear | dare_linear_svd | dare_ties | dare_ties_svd | "
        "magnitude_prune | magnitude_prune_svd (default svd)",
    )
    p.add_argument(
        "--rank", type=int, default=None, help="the *_svd combinations' rank (default: the largest)"
    )
    p.add_argument(
        "--density", type=float, default=None, help="kept fraction for ties / dare / magnitude_prune"
    )
    p.add_argument("--majority-sign", default="total", choices=["total", "frequency"])
    p.add_argument("--seed", type=int, default=0, help="DARE's random drop")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_merge_adapters)

    p = sub.add_parser(
        "extract-lora",
        help="a fine-tune's difference from its base as a PEFT LoRA adapter (truncated SVD per layer)",
    )
    p.add_argument("base", help="the base model (folder, Hub id, BASE+ADAPTER)")
    p.add_argument("finetuned", help="the fine-tuned model")
    p.add_argument("out", help="the adapter folder to write")
    p.add_argument("--rank", type=int, default=32, help="the rank of every layer, or the cap with --energy")
    p.add_argument(
        "--energy",
        type=float,
        default=None,
        help="per layer, the smallest rank keeping this fraction of Σ s² (e.g. 0.9), at most --rank",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_extract_lora)

    p = sub.add_parser(
        "align",
        help="permute a model's hidden units into a reference's order (Git Re-Basin weight matching)",
    )
    p.add_argument("reference", help="the model whose unit order the output takes")
    p.add_argument("model", help="the model to permute (same architecture, another initialization)")
    p.add_argument("out", help="the output folder (MODEL's function in REFERENCE's unit order)")
    p.add_argument(
        "--method",
        default="weight",
        choices=["weight", "activation"],
        help="weight matching (data-free) or activation matching (correlations on --data)",
    )
    p.add_argument("--data", default=None, help="activation: a .jsonl or .csv file of texts (column 'text')")
    p.add_argument("--seed", type=int, default=0, help="the order in which weight matching visits groups")
    p.add_argument(
        "--no-residual",
        action="store_true",
        help="leave the residual stream in place (FFN units and heads only)",
    )
    p.add_argument("--max-iter", type=int, default=100, help="weight matching's sweeps at most")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt checkpoints (weights_only)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser(
        "moe",
        help="build a Mixtral / Qwen2-MoE / Qwen3-MoE from dense fine-tunes (a mergekit-moe config)",
        description="Dense fine-tunes of one decoder become the experts of an MoE model: every expert's FFN is "
        "one routed expert of every layer, the base gives every other tensor, the routers come from prompts.",
        epilog=MOE_KEYS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="the MoE config (mergekit-moe's YAML)")
    p.add_argument("out", help="the output folder (a transformers MoE model)")
    p.add_argument(
        "--i-understand-this-is-not-useful-without-training",
        action="store_true",
        help="build even when every expert is the same model",
    )
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt checkpoints (weights_only)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_moe)

    p = sub.add_parser(
        "moe-inspect",
        help="how an MoE model routes a text file (also: mergesmith moe inspect MODEL --data FILE)",
    )
    p.add_argument("model", help="an HF MoE folder (Mixtral, Qwen2-MoE, Qwen3-MoE)")
    p.add_argument("--data", required=True, help="a .jsonl or .csv file of texts (column 'text')")
    p.add_argument("--limit", type=int, default=256, help="the first N texts (default 256)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text at most (default 256)")
    p.add_argument("--png", default=None, help="draw the per-layer top-1 frequency heatmap here")
    p.add_argument("--json", default=None, help="save the statistics (frequencies per layer and expert) here")
    p.set_defaults(func=cmd_moe_inspect)

    p = sub.add_parser(
        "moe-merge",
        help="merge an MoE's experts into fewer per layer (MC-SMoE; also: mergesmith moe merge MODEL OUT ...)",
    )
    p.add_argument("model", help="an HF MoE folder (Mixtral, Qwen2-MoE, Qwen3-MoE)")
    p.add_argument("out", help="the output folder (an MoE with fewer experts per layer)")
    p.add_argument("--data", required=True, help="calibration texts: a .jsonl or .csv file (column 'text')")
    p.add_argument("--groups", type=int, default=None, help="experts kept per layer (every layer)")
    p.add_argument(
        "--average-groups",
        type=int,
        default=None,
        help="MC-SMoE's adaptive counts: this many per layer on average, by a global usage threshold",
    )
    p.add_argument(
        "--method",
        default="m-smoe",
        choices=["m-smoe", "m-smoe-no-align", "uniform", "frequency-prune", "random-drop"],
        help="m-smoe: frequency-weighted merge of aligned experts (default); the others are the paper's baselines",
    )
    p.add_argument(
        "--form",
        default="remapped",
        choices=["remapped", "bound"],
        help="remapped: one expert per group, router remapped (smaller); bound: MC-SMoE's function exactly",
    )
    p.add_argument("--limit", type=int, default=256, help="calibration texts (default 256)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text at most (default 256)")
    p.add_argument("--seed", type=int, default=0, help="random-drop's choice")
    p.add_argument(
        "--recover-steps",
        type=int,
        default=0,
        help="then distil from the unmerged model this many steps on --data (experts and routers train)",
    )
    p.add_argument("--lr", type=float, default=2e-4, help="recovery learning rate (default 2e-4)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_moe_merge)

    p = sub.add_parser(
        "moe-compress",
        help="experts as low-rank + structured sparse (MC-SMoE; also: mergesmith moe compress MODEL OUT ...)",
    )
    p.add_argument("model", help="an HF MoE folder (Mixtral, Qwen2-MoE, Qwen3-MoE)")
    p.add_argument("out", help="the output folder (dense reconstruction + the factors)")
    p.add_argument(
        "--rank", type=int, default=32, help="rank of each expert matrix's low-rank part (default 32)"
    )
    p.add_argument("--remaining", type=float, default=0.10, help="share of S's rows kept (default 0.10)")
    p.add_argument(
        "--data", default=None, help="calibration texts for --steps (a .jsonl or .csv, column 'text')"
    )
    p.add_argument(
        "--steps", type=int, default=0, help="distillation steps while pruning (0: one-shot magnitude)"
    )
    p.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate (default 2e-4)")
    p.add_argument("--limit", type=int, default=256, help="calibration texts (default 256)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per text at most (default 256)")
    p.add_argument("--seed", type=int, default=0, help="the fine-tuning's seed")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_moe_compress)

    p = sub.add_parser(
        "continual",
        help="merge models that arrive one at a time, in constant memory (OPCM and continual baselines)",
        description="continual init BASE STATE --method opcm|task_arithmetic|ties|average; continual add STATE MODEL; "
        "continual export STATE OUT",
    )
    p.add_argument("action", choices=["init", "add", "export"])
    p.add_argument("first", help="init: the base model; add, export: the state folder")
    p.add_argument(
        "second", help="init: the state folder to create; add: the model; export: the output folder"
    )
    p.add_argument(
        "--method",
        default="opcm",
        choices=["opcm", "task_arithmetic", "ties", "average"],
        help="init: how each model is absorbed (default opcm)",
    )
    p.add_argument(
        "--alpha", type=float, default=None, help="init, opcm: the singular-value mass avoided (0.5)"
    )
    p.add_argument(
        "--lambda", dest="lam", type=float, default=None, help="init, task_arithmetic / ties: λ (0.3 / 0.5)"
    )
    p.add_argument("--density", type=float, default=None, help="init, ties: fraction of |τ| kept (0.2)")
    p.add_argument("--force", action="store_true", help="export: replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_continual)

    p = sub.add_parser(
        "evolve",
        help="search a recipe with CMA-ES (parameter space or layer paths), evaluated on Ray",
        description="evolve SEARCH.yaml OUT: OUT gets history.json, best_recipe.yaml, model/ and convergence.png",
    )
    p.add_argument("search", help="the SEARCH.yaml (models, the space, the optimizer, the fitness)")
    p.add_argument("out", help="the search folder (history, best recipe, merged model, plot)")
    p.add_argument("--resume", action="store_true", help="continue the search stopped in OUT")
    p.add_argument(
        "--budget", type=int, default=None, help="evaluations at most (overrides optimizer.budget)"
    )
    p.add_argument("--workers", type=int, default=2, help="Ray workers, one evaluation each at a time (2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    p.add_argument(
        "--address", default=None, help="join the Ray cluster at this address (default: a local one)"
    )
    p.add_argument(
        "--no-ray", action="store_true", help="score the candidates in this process, one at a time"
    )
    p.add_argument("--no-model", action="store_true", help="write the best recipe only, not the merged model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evolve)

    p = sub.add_parser(
        "pleas",
        help="merge two models of different initializations to a width budget (PLeaS: matching + least squares)",
    )
    p.add_argument("model_a", help="the first model (its unit order is kept)")
    p.add_argument("model_b", help="the second model (same architecture)")
    p.add_argument("out", help="the output folder (a wider model of the same family)")
    p.add_argument(
        "--budget", type=float, default=1.0, help="width over one model's: 1.0 (merged) … 2.0 (ensemble)"
    )
    p.add_argument(
        "--data", required=True, help="a .jsonl or .csv file of texts (activations, least squares)"
    )
    p.add_argument(
        "--method", default="activation", choices=["activation", "weight"], help="how units are matched"
    )
    p.add_argument("--seed", type=int, default=0, help="weight matching's visiting order")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_pleas)

    p = sub.add_parser(
        "convert-gguf",
        help="a GGUF causal language model (llama.cpp) -> a Hugging Face safetensors folder (dequantized)",
    )
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="the model folder to write (written atomically)")
    p.add_argument(
        "--dtype", default="float32", choices=DTYPE_NAMES, help="the weights' dtype (default float32)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_convert_gguf)

    p = sub.add_parser("zoo", help="build a benchmark model zoo (offline): `mergesmith zoo build text8`")
    p.add_argument(
        "action", choices=["build", "lm-eval"], help="lm-eval: export the llm zoo's tasks (--out DIR)"
    )
    p.add_argument("zoo", choices=["text8", "llm", "scratch"])
    p.add_argument("--out", default=None, help="lm-eval: the task folder to write")
    p.add_argument("--tasks", nargs="+", default=None, help="a subset of the tasks")
    p.add_argument("--quick", action="store_true", help="fewer examples (demo and smoke runs)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if a matching zoo exists")
    p.add_argument("--no-multitask", action="store_true", help="skip the multi-task reference model")
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser(
        "eval",
        help="evaluate a model: a zoo's per-task accuracy, or one task (classification, perplexity, "
        "exact-match) on a data file",
        description="Zoo mode (default): `mergesmith eval ENCODER [--zoo text8] [--quick] [--split test]`. "
        "Your benchmark: `mergesmith eval MODEL BENCH.yaml`. "
        "Task mode: `mergesmith eval MODEL --task classification|perplexity|exact-match --data "
        "FILE`. Local model folders only; nothing is downloaded.",
    )
    p.add_argument(
        "model",
        help="a Hugging Face model folder (zoo mode: an encoder, e.g. a merge of the zoo's task encoders)",
    )
    p.add_argument(
        "bench",
        nargs="?",
        default=None,
        metavar="BENCH.yaml",
        help="score MODEL (e.g. a merge of its experts) on every task of your own benchmark",
    )
    p.add_argument("--zoo", default=None, choices=["text8"], help="zoo mode: the zoo (default text8)")
    p.add_argument("--quick", action="store_true", help="zoo mode: use the quick zoo")
    p.add_argument(
        "--split", default=None, choices=["val", "test"], help="zoo mode: the split (default test)"
    )
    p.add_argument(
        "--task",
        default=None,
        choices=list(EVAL_OPTIONS),
        help="evaluate one task on --data instead of a zoo",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="classification: .jsonl or .csv of texts and labels; perplexity: a plain .txt file; "
        "exact-match: .jsonl of prompts and answers",
    )
    p.add_argument(
        "--head",
        default=None,
        metavar="HEAD.safetensors",
        help="classification: a linear head {weight, bias} over the pooled states of MODEL's "
        "encoder (default: MODEL is a sequence classifier with its own head)",
    )
    p.add_argument(
        "--pooling",
        default=None,
        choices=["mean", "cls", "last"],
        help="classification with --head: mean (default), cls (first token), last (last "
        "non-padding token, for decoders)",
    )
    p.add_argument("--text-column", default="text", help="classification: the text column (default text)")
    p.add_argument("--label-column", default="label", help="classification: the label column (default label)")
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="classification: tokens per example (default 64); perplexity: tokens per window "
        "(default: the model's context, at most 1024)",
    )
    p.add_argument(
        "--prompt-column", default="prompt", help="exact-match: the prompt column (default prompt)"
    )
    p.add_argument(
        "--answer-column", default="answer", help="exact-match: the answer column (default answer)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="exact-match: the longest greedy continuation (default 32)",
    )
    p.add_argument(
        "--keep-newlines",
        action="store_true",
        help="exact-match: compare the whole continuation (default: up to its first newline)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="FOLDER",
        help="a folder with the tokenizer (default: MODEL's own)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per forward pass (default: 32 for classification, 4 windows for "
        "perplexity, 8 prompts for exact-match, 128 in zoo mode)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "bench",
        help="benchmark the data-free methods on a zoo, or on your own models (BENCH.yaml): tables + chart",
        description="`mergesmith bench [--zoo text8]` or `mergesmith bench BENCH.yaml` (your base, experts, "
        "data and metrics; see docs/benchmark.md).",
    )
    p.add_argument("bench_file", nargs="?", default=None, metavar="BENCH.yaml", help="your own benchmark")
    p.add_argument("--zoo", default="text8", choices=["text8", "llm", "scratch", "moe", "continual"])
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the methods (and community rows)")
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds for methods with random drops (default 3, or BENCH.yaml's)",
    )
    p.add_argument("--quick", action="store_true", help="use (and build) the quick zoo")
    p.add_argument("--val-limit", type=int, default=None, help="validation examples per task for the grid")
    p.add_argument(
        "--no-search",
        action="store_true",
        help="paper defaults only: no validation grid, no best-on-val rows",
    )
    p.add_argument(
        "--out",
        default=BENCH_OUT_DEFAULT,
        help="folder for the JSON, Markdown and PNG results (default bench/results; a BENCH.yaml's out:)",
    )
    p.add_argument("--name", default=None, help="file name stem (default: the zoo's name)")
    p.add_argument(
        "--data",
        action="store_true",
        help="the data-driven methods (Fisher, RegMean, AdaMerging, Concrete, Twin, DAM) and the backdoor "
        "scenario, added to the existing results",
    )
    p.add_argument(
        "--step-scale",
        type=float,
        default=None,
        help="with --data: fraction of the papers' step counts (CPU budget; the zoo's default 0.02, the "
        "committed rows'; a BENCH.yaml's step_scale:, else 1: the papers' schedules)",
    )
    p.add_argument(
        "--no-backdoor",
        action="store_true",
        help="with --data: the data rows only; the backdoor scenario already in the results is kept",
    )
    p.add_argument(
        "--checks",
        action="store_true",
        help="with --data: rerun rows with a compromise undone (the papers' schedule, larger calibration "
        "samples; --methods picks checks by key) and compare with the committed rows",
    )
    p.add_argument(
        "--report",
        nargs="+",
        default=None,
        metavar="JSON",
        help="join finished runs (e.g. methods run in parallel) and write the reports; no merging",
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("methods", help="list methods, or show one method's parameters and paper")
    p.add_argument("name", nargs="?")
    p.add_argument(
        "--markdown", action="store_true", help="print the method and difference tables as Markdown"
    )
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] in (
        ["moe", "inspect"],
        ["moe", "merge"],
        ["moe", "compress"],
    ):  # `moe CONFIG OUT` shares the command's name
        argv = [f"moe-{argv[1]}", *argv[2:]]
    args = build_parser().parse_args(argv)
    args.command_line = "mergesmith " + shlex.join(argv)  # what the benchmark reports say made them
    previous = signal.signal(signal.SIGTERM, _terminate)
    # the library's notices (logger "mergesmith") as plain lines on stderr
    notices = logging.StreamHandler(sys.stderr)
    notices.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("mergesmith")
    logger.addHandler(notices)
    propagate, logger.propagate = logger.propagate, False
    try:
        return args.func(args)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: no output was written (rerun with --resume to reuse the finished shards)",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        logger.removeHandler(notices)
        logger.propagate = propagate


if __name__ == "__main__":
    sys.exit(main())
