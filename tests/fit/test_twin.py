"""Twin-Merging (mergesmith.fit.twin): SVD compression, exact reconstruction, routing, save/load, seeding.

A self-contained setup (no tokenizer, no fine-tuning): a tiny random BERT, two experts that are the base plus
seeded noise, and two tasks whose texts use disjoint token ids, so that the shared model's mean hidden state
tells them apart.
"""

from __future__ import annotations

import json

import pytest
import torch

from mergesmith.fit.data import Encoded
from mergesmith.fit.task import Task, TaskModel, batches
from mergesmith.fit.twin import (
    TwinMerge,
    build_twin,
    compress,
    evaluate,
    shared_features,
    svd_rank,
)

TOKENS = {"a": range(5, 10), "b": range(10, 15)}  # disjoint vocabularies
ROUTER = {"router_epochs": 60, "router_lr": 5e-3}  # the paper's 50 epochs at 5e-4 assume ~44k examples


def texts(name: str, count: int, seed: int) -> Encoded:
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(list(TOKENS[name]))
    ids = pool[torch.randint(len(pool), (count, 8), generator=g)]
    mask = torch.ones_like(ids)
    mask[count // 2 :, 6:] = 0  # some padding, so that pooling has to respect the mask
    return Encoded(ids * mask, mask, torch.randint(2, (count,), generator=g))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    module = BertModel(
        BertConfig(
            vocab_size=20,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
    ).eval()
    folder = tmp_path_factory.mktemp("tiny-bert")
    module.save_pretrained(folder)
    base = TaskModel(module).params()
    experts = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        experts.append({n: p + 0.05 * torch.randn(p.shape, generator=g) for n, p in base.items()})
    heads = {
        name: {
            "weight": torch.randn(2, 16, generator=torch.Generator().manual_seed(i)),
            "bias": torch.zeros(2),
        }
        for i, name in enumerate(TOKENS)
    }
    train = [Task(n, TaskModel(module, heads[n]), texts(n, 48, 10 + i)) for i, n in enumerate(TOKENS)]
    test = [Task(n, TaskModel(module, heads[n]), texts(n, 16, 20 + i)) for i, n in enumerate(TOKENS)]
    return {"base": base, "experts": experts, "train": train, "test": test, "folder": folder}


@pytest.fixture(scope="module")
def twin(setup) -> TwinMerge:
    return build_twin(setup["base"], setup["experts"], setup["train"], **ROUTER)


@pytest.fixture(scope="module")
def exact_twin(setup) -> TwinMerge:
    return build_twin(setup["base"], setup["experts"], setup["train"], mask_rate=0.0, router_epochs=1)


@pytest.mark.parametrize("mask_rate", [0.0, 0.5, 0.7, 0.9])
def test_compression_is_the_rank_r_truncation(mask_rate):
    delta = torch.randn(12, 9, generator=torch.Generator().manual_seed(3))
    us, v = compress(delta, mask_rate)
    u, s, vh = torch.linalg.svd(delta)
    r = int((1 - mask_rate) * len(s))
    assert us.shape == (12, r) and v.shape == (9, r) and svd_rank(len(s), mask_rate) == r
    truncated = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    torch.testing.assert_close(us @ v.T, truncated, atol=1e-5, rtol=1e-5)
    # exactly r singular values survive, and they are the r largest of δ
    kept = torch.linalg.svdvals(us @ v.T)
    torch.testing.assert_close(kept[:r], s[:r], atol=1e-5, rtol=1e-5)
    assert bool((kept[r:] < 1e-5).all())


def test_shared_expert_is_task_arithmetic_with_excluded_biases(setup, twin):
    base, experts = setup["base"], setup["experts"]
    for name, value in twin.shared.items():
        if "bias" in name:
            torch.testing.assert_close(value, base[name])  # excluded: the base value
        else:
            expected = base[name] + 0.3 * sum(e[name] - base[name] for e in experts)
            torch.testing.assert_close(value, expected)
    assert twin.info["ranks"]["encoder.layer.0.attention.self.query.weight"] == int((1 - 0.9) * 16)
    assert all(n not in twin.factors[0] for n in twin.info["excluded"])


def test_exact_parts_give_each_expert_back(setup, exact_twin):
    """mask_rate 0 keeps δ_t exactly: one-hot weights on task t rebuild expert t, zero weights give θ*."""
    for t, expert in enumerate(setup["experts"]):
        params = exact_twin.params_for(torch.nn.functional.one_hot(torch.tensor(t), 2).float())
        for name, value in expert.items():
            torch.testing.assert_close(params[name], value, atol=2e-5, rtol=1e-5)
    zero = exact_twin.params_for([0.0, 0.0])
    for name, value in exact_twin.shared.items():
        torch.testing.assert_close(zero[name], value)
    # and the dynamic model with top-1 routing on a batch routed to t equals expert t's logits
    task = setup["test"][0]
    weights = exact_twin.routing_weights(task.data, task.model, "top1")
    for i, row in enumerate(weights):
        t = int(row.argmax())
        one = task.data.batch(torch.tensor([i]))
        torch.testing.assert_close(
            exact_twin.logits(task.model, one, "top1"),
            task.model.logits(one, params=setup["experts"][t]),
            atol=1e-4,
            rtol=1e-4,
        )


def test_params_for_is_linear_in_the_weights(twin):
    w1, w2 = torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.4])
    mix = twin.params_for(0.5 * w1 + 0.5 * w2)
    p1, p2 = twin.params_for(w1), twin.params_for(w2)
    for name in mix:
        torch.testing.assert_close(mix[name], 0.5 * p1[name] + 0.5 * p2[name], atol=1e-6, rtol=1e-5)


def test_router_sends_held_out_batches_to_their_task(setup, twin):
    for t, task in enumerate(setup["test"]):
        weights = twin.routing_weights(task.data, task.model, "batch")
        assert int(weights[0].argmax()) == t
        assert float(weights[0, t]) > 0.9
        assert torch.equal(weights, weights[:1].expand_as(weights))  # batch routing: one mixture per batch
    report = evaluate(twin, setup["test"], batch_size=8)
    assert report["router_accuracy"] == {"a": 1.0, "b": 1.0}
    assert set(report["accuracy"]) == {"a", "b"}
    for task in setup["test"]:  # per-example outcomes in data order: their mean is the accuracy
        hits = report["outcomes"][task.name]
        assert hits.dtype == torch.bool and len(hits) == len(task.data)
        assert float(hits.float().mean()) == pytest.approx(report["accuracy"][task.name])


def test_routing_modes(setup, twin):
    task = setup["test"][1]
    top1 = twin.routing_weights(task.data, task.model, "top1")
    assert torch.equal(top1.sum(1), torch.ones(len(top1))) and set(top1.unique().tolist()) <= {0.0, 1.0}
    # per-example routing = each example alone in a batch of one with batch routing
    per_example = twin.logits(task.model, task.data, "example")
    for i in range(0, len(task.data), 5):
        alone = twin.logits(task.model, task.data.batch(torch.tensor([i])), "batch")
        torch.testing.assert_close(per_example[i : i + 1], alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        twin.routing_weights(task.data, task.model, "mixed")


def test_save_load_round_trip(setup, twin, tmp_path):
    from transformers import AutoModel

    twin.save(tmp_path / "twin", config_source=setup["folder"])
    loaded = TwinMerge.load(tmp_path / "twin")
    assert loaded.task_names == twin.task_names and loaded.info["ranks"] == twin.info["ranks"]
    for task in setup["test"]:
        for routing in ("batch", "top1", "example"):
            assert torch.equal(
                loaded.logits(task.model, task.data, routing), twin.logits(task.model, task.data, routing)
            )
    # the folder is an HF model: the shared expert loads as is
    hf = AutoModel.from_pretrained(tmp_path / "twin")
    named = dict(hf.named_parameters())
    for name, value in twin.shared.items():
        torch.testing.assert_close(named[name].detach(), value)


def test_save_is_atomic_with_a_manifest(setup, twin, tmp_path, monkeypatch):
    """The dynamic model's folder goes through the same output life cycle as a merge: a manifest that `verify`
    checks, no overwrite without force, and nothing left behind by a failed write."""
    from mergesmith.errors import MergeError
    from mergesmith.fit import twin as twin_module
    from mergesmith.io.output import verify

    out = tmp_path / "twin"
    twin.save(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["output_sha256"]) == {
        "model.safetensors",
        "twin_exclusive.safetensors",
        "twin_router.safetensors",
    }
    assert manifest["task_names"] == twin.task_names and verify(out) == []
    (out / "twin_router.safetensors").write_bytes(b"tampered")
    assert any("twin_router.safetensors" in problem for problem in verify(out))
    with pytest.raises(MergeError, match="exists and is not an empty folder"):
        twin.save(out)
    twin.save(out, force=True)
    assert verify(out) == []

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(twin_module, "file_digests", broken)
    with pytest.raises(OSError):
        twin.save(tmp_path / "failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twin"]  # no output, partial folder or lock left


def test_given_shared_expert_replaces_task_arithmetic_but_not_the_excluded_tensors(setup, twin):
    shared = {n: v + 1.0 for n, v in setup["base"].items()}
    given = build_twin(setup["base"], setup["experts"], setup["train"], shared=shared, **ROUTER)
    for name, value in given.shared.items():
        excluded = name in twin.info["excluded"]
        torch.testing.assert_close(value, setup["base"][name] if excluded else shared[name])
    assert given.info["shared_method"] == "given" and twin.info["shared_method"] == "task_arithmetic"


def test_same_seed_same_router(setup, twin):
    again = build_twin(setup["base"], setup["experts"], setup["train"], **ROUTER)
    other = build_twin(setup["base"], setup["experts"], setup["train"], seed=1, **ROUTER)
    for key, value in twin.router.state_dict().items():
        assert torch.equal(value, again.router.state_dict()[key])
    assert not torch.equal(twin.router.fc1.weight, other.router.fc1.weight)


def test_router_reads_the_shared_model(setup, twin):
    task = setup["train"][0]
    batch = batches(task.data, 8)[0]
    expected = task.model.features(batch, params=twin.shared)
    torch.testing.assert_close(shared_features(task.model, batch, twin.shared), expected.detach())


def test_registered_method_writes_the_shared_expert_and_fits_the_rest(setup, twin, tmp_path):
    from mergesmith.api import fit_state_dicts, merge_state_dicts
    from mergesmith.methods import get_method

    base, experts, train = setup["base"], setup["experts"], setup["train"]
    fitted = fit_state_dicts(base, experts, "twin", train, **ROUTER)
    merged = merge_state_dicts(base, experts, "twin", fitted=fitted, **ROUTER)
    for name, value in twin.shared.items():
        torch.testing.assert_close(merged[name], value, atol=0, rtol=0)
    dynamic = TwinMerge.from_fit(merged, fitted)
    for task in setup["test"]:
        assert torch.equal(dynamic.logits(task.model, task.data), twin.logits(task.model, task.data))
    # a merge's output folder (weights + mergesmith_fit.safetensors) loads as the dynamic model too
    from safetensors.torch import save_file

    from mergesmith.fit.task import FIT_FILE

    tmp_path.mkdir(exist_ok=True)
    save_file({n: t.contiguous() for n, t in merged.items()}, str(tmp_path / "model.safetensors"))
    fitted.save(tmp_path / FIT_FILE)
    reloaded = TwinMerge.load(tmp_path)
    task = setup["test"][0]
    assert torch.equal(reloaded.logits(task.model, task.data), twin.logits(task.model, task.data))
    # the schema's defaults are the paper's
    method = get_method("twin")
    assert method.param("mask_rate").default == 0.9 and method.param("router_epochs").default == 50
    assert method.param("router_lr").default == 5e-4 and method.param("router_batch_size").default == 1024
