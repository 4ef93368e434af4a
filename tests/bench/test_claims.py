"""The claims table: verdicts from the paired bootstrap on hand-made rows with known differences."""

from __future__ import annotations

import pytest
import torch

from mergesmith.bench.confidence import pack_outcomes
from mergesmith.bench.zoo.bench import claims_markdown
from mergesmith.bench.zoo.claims import Claim, check_claims


def row(hits_a: int, hits_b: int, n: int = 400) -> dict:
    """A row with ``hits_*`` of ``n`` examples right on tasks a and b (the first ones; rows share examples)."""
    outcomes = {"a": torch.arange(n) < hits_a, "b": torch.arange(n) < hits_b}
    acc = {t: float(o.float().mean()) for t, o in outcomes.items()}
    return {
        "accuracy": acc,
        "normalized": sum(acc.values()) / 2,
        "runs": [{"outcomes": pack_outcomes(outcomes)}],
    }


def entry(r: dict) -> dict:
    return {"default": r, "best": r}


@pytest.fixture
def results() -> dict:
    return {
        "tasks": ["a", "b"],
        "reference": {"finetuned": row(400, 400)},
        "methods": {
            "task_arithmetic": entry(row(300, 300)),
            "ties": entry(row(340, 340)),  # +10 points on every example block: significant
            "tsv": entry(row(302, 299)),  # +0.1: not significant
            "pcb": entry(row(250, 260)),  # −11: reversed
        },
        "claim_rows": {"dare_p0.9": row(299, 300)},  # −0.1: keeps accuracy
    }


def test_verdicts(results):
    claims = (
        Claim("p", "ties > ta", "ties:default", "task_arithmetic:default"),
        Claim("p", "tsv > ta", "tsv:default", "task_arithmetic:default"),
        Claim("p", "pcb > ta", "pcb:default", "task_arithmetic:default"),
        Claim("p", "dare keeps", "extra:dare_p0.9", "task_arithmetic:default", "keeps"),
        Claim("p", "twin near ft", "ties:default", "finetuned", "keeps2"),
        Claim("p", "missing rows are skipped", "data:nope", "ties:default"),
    )
    checked = check_claims(results, claims)
    verdicts = {c["claim"]: c["verdict"] for c in checked}
    assert verdicts == {
        "ties > ta": "reproduced",
        "tsv > ta": "not significant",
        "pcb > ta": "reversed",
        "dare keeps": "reproduced",
        "twin near ft": "not reproduced",  # 85 % of fine-tuned is not within 2 points
    }
    ties = checked[0]["difference"]
    assert ties["estimate"] == pytest.approx(0.1) and ties["low"] > 0
    table = claims_markdown(checked)
    assert "**reversed**" in table and "+10.0 [" in table
