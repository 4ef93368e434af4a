"""``mergesmith tokensurgeon``: shared tokens keep the model's rows; a new token whose donor row is a sparse
combination of shared tokens' donor rows gets exactly that combination of the model's rows (OMP recovers it);
the output has the donor's tokenizer, loads and generates."""

from __future__ import annotations

import pytest
import torch

from mergesmith.api.tokensurgeon import omp
from mergesmith.cli import main
from tests.api.test_vocabulary import SHARED, build
from tests.helpers import load_tensors


def test_omp_recovers_a_sparse_combination():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(40, 24, generator=g)
    target = 0.7 * atoms[3] - 1.2 * atoms[17] + 0.4 * atoms[30]
    index, coefficients = omp(target.unsqueeze(0), atoms, k=8)
    got = dict(zip(index[0].tolist(), coefficients[0].tolist()))
    assert {i for i, c in got.items() if abs(c) > 1e-6} == {3, 17, 30}
    assert got[3] == pytest.approx(0.7) and got[17] == pytest.approx(-1.2) and got[30] == pytest.approx(0.4)


def test_transplanted_tokenizer(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # rows wider than the shared vocabulary: the shared donor rows are linearly independent, so a new token's
    # combination of them is unique and OMP's least squares over any superset of its two atoms returns it
    build(tmp_path / "model", SHARED, 0, hidden=128)
    build(tmp_path / "donor", [*SHARED, "zebra", "walrus"], 1, hidden=128)
    donor_tok = AutoTokenizer.from_pretrained(tmp_path / "donor")
    model_tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    donor = load_tensors(tmp_path / "donor")
    vocab = sorted(donor_tok.get_vocab())  # sorted: the tokenizer's dict order varies from process to process
    new = [t for t in vocab if t not in model_tok.get_vocab()]
    shared = [t for t in vocab if t in model_tok.get_vocab() and t not in ("<s>", "</s>")]
    assert len(shared) < 128
    # make every new token's donor rows an exact combination of two shared tokens' rows
    a, b = (donor_tok.convert_tokens_to_ids(t) for t in shared[:2])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for token in new:
            i = donor_tok.convert_tokens_to_ids(token)
            donor[name][i] = 0.6 * donor[name][a] - 0.3 * donor[name][b]
    from safetensors.torch import save_file

    save_file(donor, str(tmp_path / "donor" / "model.safetensors"), metadata={"format": "pt"})

    code = main(
        ["tokensurgeon", str(tmp_path / "model"), str(tmp_path / "donor"), str(tmp_path / "out"), "--quiet"]
    )
    assert code == 0 and "approximated (OMP, k=64)" in capsys.readouterr().out
    out, mine = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "model")
    ma, mb = (model_tok.convert_tokens_to_ids(t) for t in shared[:2])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape[0] == len(donor_tok)
        for token in shared:
            torch.testing.assert_close(
                out[name][donor_tok.convert_tokens_to_ids(token)],
                mine[name][model_tok.convert_tokens_to_ids(token)],
            )
        for token in new:
            want = 0.6 * mine[name][ma] - 0.3 * mine[name][mb]
            torch.testing.assert_close(
                out[name][donor_tok.convert_tokens_to_ids(token)], want, atol=1e-5, rtol=1e-4
            )
    for name in mine:
        if "embed" not in name and "lm_head" not in name:
            assert torch.equal(out[name], mine[name]), name
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tokenizer("walrus zebra alpha", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
