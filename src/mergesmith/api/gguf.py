"""``mergesmith convert-gguf GGUF OUT``: a GGUF causal language model (llama.cpp's file format) → a Hugging Face
folder of safetensors weights, config and tokenizer, which every other mergesmith command reads.

transformers does the reading (``from_pretrained(..., gguf_file=)``): it maps llama.cpp's tensor names
(``blk.N.attn_q.weight``) to its own, undoes the row permutation llama.cpp applies to Llama's q/k projections,
dequantizes every block-quantized tensor (Q4_1, Q8_0, …) and builds the tokenizer from the GGUF's metadata. This
module checks the file first, so that a missing, foreign, truncated or non-causal-LM file is one line, writes the
folder atomically (``io.output.atomic_folder``), and records where the weights came from in
``mergesmith_convert.json``: the source file and its sha256, how many tensors of each GGUF type it held, the
parameter count, and that dequantized weights carry the GGUF's quantization error (they are the quantized model in
floating point, not the model before quantization).

``gguf`` and ``transformers`` are optional dependencies (the ``llm`` extra): they are imported when a conversion
runs, and their absence is a one-line error saying what to install.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergesmith.dtypes import DTYPE_BY_NAME
from mergesmith.errors import CheckpointError, MergeError
from mergesmith.fit.hf import quiet_transformers
from mergesmith.io.output import atomic_folder
from mergesmith.io.writer import sha256_file
from mergesmith.version import __version__

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (any version, either byte order)
RECORD = "mergesmith_convert.json"
# the GGUF tensor types that hold values, not quantized blocks
FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})
INSTALL_HINT = "pip install 'mergesmith[llm]' (or: pip install gguf transformers)"
QUANTIZATION_NOTE = (
    "The weights are the GGUF's tensors dequantized by transformers: every tensor stored in a quantized GGUF type "
    "carries that type's quantization error. They are the quantized model written in floating point, not the "
    "weights the model had before it was quantized."
)


@dataclass
class GgufHeader:
    """What the GGUF's header says, read with the ``gguf`` package's GGUFReader (no tensor data is read)."""

    architecture: str  # general.architecture, llama.cpp's name ("llama", "qwen2", "bert", …)
    name: str | None  # general.name, if the file has one
    tensor_types: dict[str, int]  # GGUF tensor type name ("Q4_1", "Q8_0", "F32", …) -> how many tensors
    tensors: int

    @property
    def quantized_tensors(self) -> int:
        """How many tensors are stored in a block-quantized type (their dequantized values are approximate)."""
        return sum(n for t, n in self.tensor_types.items() if t not in FLOAT_TYPES)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _field_value(reader: Any, key: str) -> Any:
    """A scalar or string metadata value of a GGUFReader, or None when the file lacks the key."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def read_gguf_header(path: Path) -> GgufHeader:
    """The header of the GGUF file at ``path``. A file that is not a GGUF (no magic) or that is corrupt or
    truncated (its header does not parse, or its tensors end past the end of the file) is a CheckpointError."""
    try:
        import gguf
    except ImportError:
        raise MergeError(f"{path}: reading a GGUF file needs the gguf package; {INSTALL_HINT}") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf model file"
        )
    try:
        reader = gguf.GGUFReader(path)
        # GGUFReader memory-maps the file and builds a view per tensor; checking the ends as well keeps a
        # truncated file an error even where a reader version would hand out a short view
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
        if end > os.path.getsize(path):
            raise ValueError(f"its tensor data ends at byte {end}, past the end of the file")
        architecture = _field_value(reader, "general.architecture")
        name = _field_value(reader, "general.name")
        types = Counter(t.tensor_type.name for t in reader.tensors)
    except Exception as e:  # the reader's errors on a damaged file are numpy's (ValueError, IndexError, …)
        raise CheckpointError(
            f"{path}: a corrupt or truncated GGUF file ({_first_line(e)}); download or copy it again"
        ) from None
    if not isinstance(architecture, str):
        raise CheckpointError(f"{path}: the GGUF has no general.architecture; it is not a model file")
    return GgufHeader(architecture, name, dict(sorted(types.items())), len(reader.tensors))


def causal_gguf_architectures() -> list[str]:
    """The GGUF architectures (as transformers' tables name them) the installed transformers loads as causal LMs, for
    error messages. Read from transformers' own tables, which moved between versions: best effort."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        # the table's keys are model types; gemma3/gemma4 load as their text-only model types
        names |= {a for a in GGUF_SUPPORTED_ARCHITECTURES if a in causal or f"{a}_text" in causal}
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        names |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32 as ``value``. GGUF stores metadata floats in 32 bits, so a
    config's ``rms_norm_eps: 1e-05`` arrives as 9.999999747378752e-06; both are one float32, and the model computes
    with the float32 either way."""
    single = np.float32(value)
    if not np.isfinite(single) or float(single) != value:
        return value  # not a float32 value: it did not come from GGUF metadata
    return float(str(single))


def tidy_config(config: Any) -> None:
    """Write the config's float32-read floats (top level and one dict level down, e.g. ``rope_parameters``) as
    their shortest decimals, so config.json reads like the original model's."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float):
            setattr(config, key, shortest_float32(value))
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, float):
                    value[k] = shortest_float32(v)


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, *, force: bool = False, dtype: str = "float32"
) -> Path:
    """Convert the GGUF causal LM at ``gguf_path`` into the Hugging Face folder ``out_dir`` (config.json,
    generation_config.json, model.safetensors, tokenizer files, mergesmith_convert.json), in ``dtype``. The folder
    appears only complete; an existing non-empty one is replaced only with ``force``. Returns ``out_dir``."""
    path, out = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPE_BY_NAME:
        raise MergeError(f"dtype '{dtype}' is not one of {', '.join(DTYPE_BY_NAME)}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; give the path of a .gguf model file")
    if not path.is_file():
        raise CheckpointError(f"{path}: is a folder, not a GGUF file; give the path of a .gguf model file")
    header = read_gguf_header(path)
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        raise MergeError(f"{path}: converting a GGUF needs transformers; {INSTALL_HINT}") from None

    # transformers resolves a relative gguf_file against the current directory before the folder, so an
    # absolute path is the only spelling that cannot pick up a same-named file elsewhere
    folder, file = str(path.parent.resolve()), str(path.resolve())

    def not_causal() -> CheckpointError:
        return CheckpointError(
            f"{path}: its architecture '{header.architecture}' is not a causal language model that transformers "
            f"{transformers.__version__} loads from GGUF (it loads {', '.join(causal_gguf_architectures())}); "
            "convert-gguf converts decoder-only LLMs"
        )

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(folder, gguf_file=file, local_files_only=True)
    except Exception as e:
        # "... is not supported": transformers' wording for an architecture it has no GGUF mapping for
        if isinstance(e, ValueError) and "not supported" in str(e):
            raise not_causal() from None
        raise CheckpointError(f"{path}: transformers cannot read its metadata ({_first_line(e)})") from None
    # transformers reads some non-causal architectures from GGUF too (T5)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise not_causal()

    with atomic_folder(out, force=force) as partial:
        model = load_dense_model(path, folder, file, DTYPE_BY_NAME[dtype], AutoModelForCausalLM)
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, local_files_only=True)
        except Exception as e:
            raise CheckpointError(
                f"{path}: transformers cannot build its tokenizer ({_first_line(e)})"
            ) from None
        tidy_config(model.config)
        # safetensors is save_pretrained's only format in transformers 5 (which has no safe_serialization
        # argument) and its default since 4.35
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        record = {
            "source": {
                "file": path.name,
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "architecture": header.architecture,
                "name": header.name,
                "tensors": header.tensors,
                "tensor_types": header.tensor_types,
                "quantized_tensors": header.quantized_tensors,
            },
            "output": {
                "dtype": dtype,
                "parameters": sum(p.numel() for p in model.parameters()),
                "model_type": model.config.model_type,
                "architectures": [type(model).__name__],
            },
            "dequantized": header.quantized_tensors > 0,
            "note": QUANTIZATION_NOTE,
            "converted_with": {"mergesmith": __version__, "transformers": transformers.__version__},
        }
        (partial / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return out


def load_dense_model(path: Path, folder: str, file: str, dtype: torch.dtype, auto_class: Any) -> Any:
    """The GGUF's model with every weight dequantized to ``dtype`` and no quantizer attached, so that
    save_pretrained writes plain tensors. A GGUF that lacks some of the model's tensors is a CheckpointError
    (transformers would fill them with random values)."""
    kwargs: dict[str, Any] = {}
    try:  # transformers ≥ 5 can keep GGUF blocks packed in its layers; a conversion needs them unpacked
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older versions always dequantize
        pass
    try:
        with quiet_transformers():
            model, info = auto_class.from_pretrained(
                folder, gguf_file=file, dtype=dtype, local_files_only=True, output_loading_info=True, **kwargs
            )
    except Exception as e:
        raise CheckpointError(f"{path}: transformers cannot load its weights ({_first_line(e)})") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise CheckpointError(
            f"{path}: the GGUF lacks {len(missing)} of the model's tensors (first: '{missing[0]}'); it is not a "
            "complete model file transformers can read"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers ≥ 5 attaches its GGUF quantizer even to a dequantized model
        quantizer.remove_quantization_config(model)
    # a weight still in GGUF blocks is an integer tensor; floats may legitimately differ from ``dtype`` (a model's
    # modules kept in float32)
    packed = [(n, t.dtype) for n, t in model.state_dict().items() if not t.is_floating_point()]
    if packed:
        raise CheckpointError(
            f"{path}: transformers left '{packed[0][0]}' packed ({packed[0][1]}); this GGUF cannot be converted "
            "with the installed transformers"
        )
    return model.eval()
