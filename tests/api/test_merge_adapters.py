"""``mergesmith merge-adapters``: every combination of PEFT's ``add_weighted_adapter`` gives PEFT's factors (DARE at
density 1, where PEFT's unseeded drop keeps everything); DARE's drop is seeded and reproducible; cat is exact."""

from __future__ import annotations

import pytest
import torch

from mergesmith.api.merge_adapters import merge_adapters
from mergesmith.cli import main
from mergesmith.errors import RecipeError
from tests.helpers import build_llama, load_tensors

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """A base and a PEFT model holding two adapters with random factors (ranks 2 and 4, and two of rank 2)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base = build_llama(root / "base", 0)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base), LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS), "one"
    )
    model.add_adapter("two", LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS))
    model.add_adapter("three", LoraConfig(r=2, lora_alpha=8, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    for name in ("one", "two", "three"):
        model.save_pretrained(root / "saved", selected_adapters=[name])
    return root, model


CASES = [
    ("cat", ["one", "two"], {}),
    ("svd", ["one", "two"], {"svd_rank": 3}),
    ("ties_svd", ["one", "two"], {"density": 0.5}),
    ("magnitude_prune_svd", ["one", "two"], {"density": 0.3}),
    ("dare_linear_svd", ["one", "two"], {"density": 1.0}),
    ("linear", ["one", "three"], {}),
    ("ties", ["one", "three"], {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", ["one", "three"], {"density": 0.4}),
    ("dare_ties", ["one", "three"], {"density": 1.0}),
]


@pytest.mark.parametrize("combination,names,options", CASES, ids=[c[0] for c in CASES])
def test_same_factors_as_peft(peft_pair, tmp_path, combination, names, options):
    from peft.utils import get_peft_model_state_dict

    root, model = peft_pair
    weights = [0.7, -0.4]
    merged = f"m_{combination}"
    model.add_weighted_adapter(names, weights, merged, combination_type=combination, **options)
    want = get_peft_model_state_dict(model, adapter_name=merged)
    folders = [str(root / "saved" / n) for n in names]
    merge_adapters(
        folders,
        tmp_path / "ours",
        weights=weights,
        combination=combination,
        rank=options.get("svd_rank"),
        density=options.get("density"),
        majority_sign=options.get("majority_sign_method", "total"),
    )
    got = load_tensors(tmp_path / "ours")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key].float(), atol=1e-6, rtol=1e-5, msg=key)


def test_dare_is_seeded_and_rejects_mismatched_ranks(peft_pair, tmp_path, capsys):
    root, _ = peft_pair
    one, two = str(root / "saved" / "one"), str(root / "saved" / "two")
    args = ["merge-adapters", "--combination", "dare_ties_svd", "--density", "0.5", "--seed", "3"]
    assert main([*args[:1], str(tmp_path / "a"), one, two, *args[1:]]) == 0
    assert main([*args[:1], str(tmp_path / "b"), one, two, *args[1:]]) == 0
    a, b = load_tensors(tmp_path / "a"), load_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RecipeError, match="needs every adapter to adapt the same layers at one rank"):
        merge_adapters([one, two], tmp_path / "c", combination="linear")
    assert not (tmp_path / "c").exists()
