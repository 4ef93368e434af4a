"""``mergesmith moe inspect MODEL --data FILE``: how an MoE model routes a text file's tokens.

Per MoE layer: each expert's top-1 and top-k frequency and mean router probability on the data's real tokens
(:func:`mergesmith.fit.moe_routing.router_statistics`), printed as a table, saved as JSON, and drawn as a heatmap
(layers × experts, top-1 frequency) in a PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergesmith.fit.data import Encoded, encode
from mergesmith.fit.evaluate import model_folder, padded_tokenizer
from mergesmith.fit.hf import load_causal_lm
from mergesmith.fit.moe_routing import RouterStats, router_statistics
from mergesmith.recipe.data import DataSpec, read_examples

INSPECT_BATCH = 8


def calibration_batches(folder: Path, data: str | Path, limit: int, max_length: int) -> list[Encoded]:
    """The first ``limit`` texts of ``data`` (.jsonl/.csv, column ``text``) tokenized with the model's tokenizer,
    each cut to ``max_length`` tokens, in batches."""
    examples = read_examples(DataSpec(path=str(data)), need_labels=False, where=str(data))
    texts = examples.texts[:limit]
    encoded = encode(padded_tokenizer(folder), texts, [-1] * len(texts), max_length)
    return [encoded.batch(slice(i, i + INSPECT_BATCH)) for i in range(0, len(encoded), INSPECT_BATCH)]


def inspect_moe(
    model: str | Path, data: str | Path, *, limit: int = 256, max_length: int = 256
) -> RouterStats:
    """Router statistics of ``model`` (an HF MoE folder) on :func:`calibration_batches` of ``data``."""
    folder = model_folder(model)
    return router_statistics(load_causal_lm(folder), calibration_batches(folder, data, limit, max_length))


def table(stats: RouterStats) -> str:
    """Per layer, each expert's top-1 % and top-k % (Markdown)."""
    experts = stats.top1.shape[1]
    head = "| layer | " + " | ".join(f"expert {e} top-1 / top-{stats.k} %" for e in range(experts)) + " |"
    lines = [head, "|" + "---|" * (experts + 1)]
    for row, layer in enumerate(stats.layers):
        cells = [
            f"{100 * float(stats.top1[row, e]):.1f} / {100 * float(stats.topk[row, e]):.1f}"
            for e in range(experts)
        ]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{stats.tokens} tokens.\n"


def heatmap(stats: RouterStats, path: str | Path, title: str = "") -> Path:
    """Layers × experts, colour = top-1 frequency (%), each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = 100 * stats.top1.numpy()
    layers, experts = values.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * experts, 1.0 + 0.35 * layers))
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=100)
    for i in range(layers):
        for j in range(experts):
            ax.text(
                j,
                i,
                f"{values[i, j]:.0f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if values[i, j] < 60 else "black",
            )
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers), [str(layer) for layer in stats.layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title or f"top-1 routing frequency (%), {stats.tokens} tokens", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(stats: RouterStats, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stats.to_dict(), indent=1) + "\n")
    return out
