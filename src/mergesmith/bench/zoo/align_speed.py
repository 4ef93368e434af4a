"""How long weight matching takes on models of real sizes (#18): two MiniLM-sized BERT encoders and two 135M
Llamas (SmolLM2-135M's config), each pair initialized with different seeds, all groups (FFN units, heads, the
residual stream).

``python -m mergesmith.bench.zoo.align_speed [--out bench/results]`` writes ``align-speed.{json,md}``: per pair the
parameter count, the sweeps until no sweep improves, the seconds in all and per sweep, and the threads used.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from mergesmith.arch.permutation import permutation_spec
from mergesmith.ops.permute import weight_matching

MINILM = {  # sentence-transformers/all-MiniLM-L6-v2's architecture
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M's architecture
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def random_state(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialized model's weights (transformers' own init) for ``config``."""
    hf = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(hf) if config["model_type"] == "bert" else None
    if model is None:
        model = transformers.AutoModelForCausalLM.from_config(hf)
    return {k: v.detach() for k, v in model.state_dict().items()}


def time_pair(name: str, config: dict[str, Any]) -> dict[str, Any]:
    a, b = random_state(config, 0), random_state(config, 1)
    spec = permutation_spec(config, {k: tuple(v.shape) for k, v in a.items()})
    started = time.perf_counter()
    _, report = weight_matching(spec, a, b, seed=0)
    seconds = time.perf_counter() - started
    return {
        "pair": name,
        "parameters": sum({v.data_ptr(): v.numel() for v in a.values()}.values()),  # a tied head once
        "groups": len(spec.groups),
        "sweeps": report.sweeps,
        "seconds": round(seconds, 2),
        "seconds_per_sweep": round(seconds / report.sweeps, 2),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    rows = [
        time_pair("MiniLM-L6-sized BERT ×2", MINILM),
        time_pair("SmolLM2-135M-sized Llama ×2", SMOLLM2_135M),
    ]
    out = Path(args.out)
    command = "python -m mergesmith.bench.zoo.align_speed"
    (out / "align-speed.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# Weight matching speed — `{command}`",
        "",
        "| pair | parameters | groups | sweeps | seconds | s / sweep | threads |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['pair']} | {r['parameters'] / 1e6:.1f} M | {r['groups']} | {r['sweeps']} | {r['seconds']} | "
        f"{r['seconds_per_sweep']} | {r['threads']} |"
        for r in rows
    ]
    (out / "align-speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
