"""Does entropy minimisation collapse weak tasks onto one class? Fit task-wise AdaMerging (the data bench's default
row, seed 0) and count, per task, the share of test predictions in the most predicted class, against task
arithmetic at λ = 0.3 (its starting point)."""
import json
from collections import Counter

import torch

from mergesmith.api import fit_state_dicts, merge_state_dicts
from mergesmith.bench.zoo import databench
from mergesmith.bench.zoo.text8 import Zoo
from mergesmith.fit.evaluate import ClassificationTask
from mergesmith.fit.task import TaskModel
from mergesmith.io.cache import zoo_dir

zoo = Zoo(zoo_dir("text8"))
bench = databench.DataBench(zoo, progress=False)
row = next(r for r in databench.rows(0.02) if r.key == "adamerging_task")
tasks = bench.tasks("test", None, False)
fitted = fit_state_dicts(bench.base, bench.experts, row.method, tasks, seed=0, progress=False, **row.params)
states = {
    "task_arithmetic": merge_state_dicts(bench.base, bench.experts, "task_arithmetic", **{"lambda": 0.3}),
    "adamerging_task": merge_state_dicts(bench.base, bench.experts, row.method, fitted=fitted, **row.params),
}
out = {"lambdas": fitted.info.get("lambdas"), "tasks": {}}
for name, state in states.items():
    for t in zoo.tasks:
        model = TaskModel(zoo.shared_module(), zoo.head(t), autocast=torch.bfloat16)
        logits = ClassificationTask(zoo.split(t, "test"), t).logits(model, state, 128)
        pred = logits.argmax(1)
        top = Counter(pred.tolist()).most_common(1)[0][1] / len(pred)
        probs = logits.softmax(1)
        entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(1).mean())
        acc = float((pred == zoo.split(t, "test").labels).float().mean())
        out["tasks"].setdefault(t, {})[name] = {"accuracy": acc, "top_class_share": top, "mean_entropy": entropy}
print(json.dumps(out, indent=1))
