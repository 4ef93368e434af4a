"""Property-based fuzzing (hypothesis, bounded) of the two places that read untrusted input: the recipe parser and
the safetensors header reader. Whatever the input, the only outcomes are a valid result or our one-line error."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mergesmith import RecipeError, load_recipe
from mergesmith.errors import CheckpointError
from mergesmith.io.safetensors_io import SafetensorsFile
from mergesmith.methods import get_method
from mergesmith.methods.base import resolve_method_params

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "merge_method",
        "models",
        "base_model",
        "parameters",
        "slices",
        "dtype",
        "compat",
        "seed",
        "model",
        "layer_range",
        "sources",
        "filter",
        "value",
        "weight",
        "density",
        "junk",
    ]
)
recipes = st.dictionaries(keys, values, max_size=6)


@FUZZ
@given(recipes)
@example({"merge_method": ""})  # found: an empty method name was accepted
def test_recipe_parser_never_crashes(data):
    try:
        recipe = load_recipe(data)
    except RecipeError as e:
        assert "\n" not in str(e)
        return
    assert recipe.merge_method


@FUZZ
@given(st.text(max_size=300))
def test_yaml_text_never_crashes(text):
    try:
        load_recipe(text + "\n")
    except RecipeError as e:
        assert "\n" not in str(e)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["weight", "density", "lambda", "trim_scope", "disjoint", "bogus"]),
        scalars,
        max_size=4,
    )
)
def test_parameter_validation_never_crashes(params):
    try:
        resolve_method_params(get_method("ties"), params, [dict(params), {}])
    except RecipeError as e:
        assert "\n" not in str(e)


entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F33", ""]),
        "shape": st.lists(st.integers(-2, 6), max_size=3),
        "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3),
    }
)


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=6), st.one_of(entries, values), max_size=4),
    data=st.binary(max_size=64),
    cut=st.integers(0, 200),
    raw_len=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
@example(
    header={"\n": {"dtype": "F32", "shape": [], "data_offsets": []}}, data=b"", cut=65, raw_len=None
)  # found
def test_safetensors_reader_never_crashes(tmp_path, header, data, cut, raw_len):
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw) if raw_len is None else raw_len) + raw + data
    blob = blob[: max(cut, len(blob) // 2)] if cut < len(blob) else blob
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    for name in f.keys():  # whatever was accepted must be readable within the file
        tensor = f.get(name)
        assert tensor.numel() * tensor.element_size() <= len(blob)
    f.close()
