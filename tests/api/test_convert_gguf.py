"""``mergesmith convert-gguf``: a tiny Llama written as a GGUF the way llama.cpp's convert_hf_to_gguf.py writes one
(its tensor names, the q/k row permutation, the ``llama.*`` and ``tokenizer.ggml.*`` metadata) comes back as the
same model — the same tensors bit for bit, config, logits and tokenizer —, a Q8_0 tensor comes back as gguf's own
dequantization of it, and every bad input is one line that writes nothing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesmith.api.gguf import RECORD, convert_gguf
from mergesmith.cli import main
from mergesmith.errors import MergeError
from tests.helpers import load_tensors

gguf = pytest.importorskip("gguf")

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, CONTEXT = 32, 64, 2, 2, 1, 128
EPS, THETA = 1e-5, 10000.0
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "a t"]
# llama.cpp's names for a Llama layer's modules (gguf.constants MODEL_TENSOR names)
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def byte_level_tokens() -> list[str]:
    """A byte-level BPE vocabulary in GPT-2's byte spelling: <|endoftext|>, printable ASCII, and the merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return ["<|endoftext|>"] + [spelling[b] for b in range(32, 127)] + [m.replace(" ", "") for m in MERGES]


def tiny_llama(tied: bool) -> torch.nn.Module:
    """A random fp32 LlamaForCausalLM with grouped-query attention (2 heads, 1 key/value head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(byte_level_tokens()),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=EPS,
        rope_theta=THETA,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from their all-ones init, so a dropped or swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    return model


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotary halves → llama.cpp's interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, *module, _ = hf_name.split(".")
    return f"blk.{layer}.{BLOCK_NAMES['.'.join(module)]}.weight"


def write_gguf(
    path: Path, model: torch.nn.Module, *, architecture: str = "llama", q8_0: tuple[str, ...] = ()
) -> Path:
    """``model`` as llama.cpp writes a Llama GGUF: F32 tensors (those in ``q8_0``, by GGUF name, as Q8_0),
    q/k rows permuted, no output.weight for tied embeddings, the llama.* and gpt2 tokenizer metadata."""
    tokens = byte_level_tokens()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_freq_base(THETA)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    tied = model.config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        array = tensor.numpy()
        if "q_proj" in name:
            array = llama_cpp_permute(array, HEADS, HEADS)
        elif "k_proj" in name:
            array = llama_cpp_permute(array, HEADS, KV_HEADS)
        array = np.ascontiguousarray(array)
        if gguf_name(name) in q8_0:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = tiny_llama(tied=False)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model), model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_gives_the_same_model(tied, untied, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if tied:
        model = tiny_llama(tied=True)
        source = write_gguf(tmp_path / "tied.gguf", model)
        out = convert_gguf(source, tmp_path / "hf")
    else:
        source, model = untied
        out = tmp_path / "hf"
        assert main(["convert-gguf", str(source), str(out)]) == 0
        printed = capsys.readouterr().out
        assert "llama GGUF (21 F32 tensors)" in printed and "dequantized" not in printed

    original = model.state_dict()
    converted = load_tensors(out)
    # save_pretrained leaves out a tied head
    expected = {n for n in original if not (tied and n == "lm_head.weight")}
    assert set(converted) == expected
    for name in expected:
        assert converted[name].dtype == torch.float32
        assert torch.equal(converted[name], original[name]), name

    config = AutoConfig.from_pretrained(out)
    assert not hasattr(config, "quantization_config")
    for key in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "head_dim",
        "rms_norm_eps",  # GGUF stores it as a float32; written back as 1e-05, not 9.9999997e-06
        "tie_word_embeddings",
    ):
        assert getattr(config, key) == getattr(model.config, key), key
    assert config.rope_parameters["rope_theta"] == THETA
    assert (out / "generation_config.json").exists()

    ids = torch.tensor([[0, 5, 17, 42, 96, 100, 3, 64]])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)

    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = byte_level_tokens()
    encoded = tokenizer("the cat in a hat", add_special_tokens=False).input_ids
    assert [tokens[i] for i in encoded] == ["t", "he", "Ġ", "c", "at", "Ġ", "in", "Ġa", "Ġ", "h", "at"]
    assert tokenizer.decode(encoded) == "the cat in a hat"
    assert tokenizer.eos_token == "<|endoftext|>"

    record = json.loads((out / RECORD).read_text())
    assert record["source"]["file"] == source.name
    assert record["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["source"]["tensor_types"] == {"F32": len(expected)}
    assert record["output"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert record["dequantized"] is False and "quantization error" in record["note"]
    assert sorted(os.listdir(tmp_path)) == sorted(["hf", *([source.name] if tied else [])])  # no leftovers


def test_a_q8_0_tensor_comes_back_as_ggufs_dequantization(tmp_path):
    model = tiny_llama(tied=True)  # SmolLM2's layout: tied embedding, stored Q8_0
    quantized = ("token_embd.weight", "blk.0.ffn_up.weight")
    source = write_gguf(tmp_path / "q8.gguf", model, q8_0=quantized)
    out = convert_gguf(source, tmp_path / "hf")
    converted, original = load_tensors(out), model.state_dict()
    reader = gguf.GGUFReader(str(source))
    stored = {t.name: t for t in reader.tensors}
    for gguf_tensor, hf_name in (
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
    ):
        t = stored[gguf_tensor]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(converted[hf_name], expected), hf_name
        error = (converted[hf_name] - original[hf_name]).abs().max()
        assert 0 < error < 0.01 * original[hf_name].abs().max()  # approximate, as 8 bits per weight are
    assert torch.equal(
        converted["model.layers.0.mlp.down_proj.weight"], original["model.layers.0.mlp.down_proj.weight"]
    )
    record = json.loads((out / RECORD).read_text())
    assert record["source"]["tensor_types"] == {"F32": 18, "Q8_0": 2}
    assert record["source"]["quantized_tensors"] == 2 and record["dequantized"] is True


def test_dtype_sets_the_weights_dtype(untied, tmp_path):
    source, model = untied
    out = convert_gguf(source, tmp_path / "hf", dtype="bfloat16")
    converted = load_tensors(out)
    for name, tensor in model.state_dict().items():
        assert converted[name].dtype == torch.bfloat16
        assert torch.equal(converted[name], tensor.to(torch.bfloat16)), name
    assert json.loads((out / RECORD).read_text())["output"]["dtype"] == "bfloat16"
    with pytest.raises(MergeError, match="dtype 'int8' is not one of"):
        convert_gguf(source, tmp_path / "other", dtype="int8")


def bad_input(kind: str, folder: Path, untied: tuple[Path, torch.nn.Module]) -> Path:
    """A GGUF path that must be refused: ``kind`` says what is wrong with it."""
    valid = untied[0].read_bytes()
    path = folder / f"{kind}.gguf"
    if kind == "missing":
        return path
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        path.write_bytes(valid[: len(valid) // 2])
    elif kind == "truncated-end":
        path.write_bytes(valid[:-1])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bert":  # an encoder: transformers has no GGUF loader for it
        writer = gguf.GGUFWriter(str(path), "bert")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("missing", "no such file"),
        ("folder", "is a folder"),
        ("random", "not a GGUF file"),
        ("empty", "not a GGUF file"),
        ("truncated", "corrupt or truncated"),
        ("truncated-end", "corrupt or truncated"),
        ("bert", "architecture 'bert' is not a causal language model"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(kind, says, untied, tmp_path):
    source = bad_input(kind, tmp_path, untied)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(MergeError) as caught:
        convert_gguf(source, tmp_path / "hf")
    message = str(caught.value)
    assert says in message and "\n" not in message and source.name in message
    assert sorted(os.listdir(tmp_path)) == before


def test_non_empty_output_needs_force(untied, tmp_path):
    source, _ = untied
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError) as caught:
        convert_gguf(source, out)
    assert "not an empty folder" in str(caught.value) and "\n" not in str(caught.value)
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["hf"]
    convert_gguf(source, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_without_the_gguf_package_it_says_what_to_install(untied, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(MergeError) as caught:
        convert_gguf(untied[0], tmp_path / "hf")
    assert "pip install" in str(caught.value) and "mergesmith[llm]" in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_cli_error_is_one_line_on_stderr(tmp_path, capsys):
    code = main(["convert-gguf", str(tmp_path / "nothing.gguf"), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1 and "nothing.gguf" in err
    assert os.listdir(tmp_path) == []
