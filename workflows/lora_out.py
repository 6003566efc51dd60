"""`output.format: lora`: the merged model also written as a PEFT adapter on the base, under lora/.

One Ray task per model part factors that part's changed linear weights (workers/lora_out.py); the
driver gathers the factors (small: r x (in + out) per weight), adds the tensors saved whole and writes
adapter_model.safetensors and adapter_config.json, which `PeftModel.from_pretrained(base, OUT/lora)`
loads.
"""

from __future__ import annotations

import json
import re
from collections import Counter

from safetensors.torch import save

from mergeflow.errors import ConfigError
from mergeflow.infra.storage import join, storage_for
from mergeflow.infra.tracking import redact
from mergeflow.workers.dtypes import FLOAT_CODES
from mergeflow.workers.lora_out import PREFIX, PartSpec, Target, concat_factors, export_part, module_of, whole_tensors
from mergeflow.workers.safetensors_io import read_header
from mergeflow.workflows import runtime
from mergeflow.workflows.commit import SINGLE_FILE, _put
from mergeflow.workflows.plan import Plan

# Model types whose linear layers are GPT-2's Conv1D, weights stored (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt"})


def _model_type(plan: Plan, options) -> str | None:
    if plan.base.config_json is None:
        return None
    try:
        return json.loads(storage_for(plan.base.config_json, options).read_bytes(plan.base.config_json)).get(
            "model_type"
        )
    except (ValueError, AttributeError):
        return None


def check(plan: Plan) -> None:
    """Before any work: `concat` needs Task Arithmetic (a plain scaled sum) over adapters only."""
    lora = plan.config.lora_out
    if lora is None or not lora.concat:
        return
    if not plan.method.running_sum:
        raise ConfigError(
            f"output.concat: the concatenated adapter is exact only for a scaled sum of task vectors "
            f"(task_arithmetic), not {plan.method.name}; use rank or energy (truncated SVD) instead"
        )
    for name, cp in zip(plan.task_names, plan.tasks):
        if cp.adapter is None:
            raise ConfigError(
                f"output.concat: task {name!r} ({redact(cp.uri)}) is a full checkpoint, not a LoRA adapter; "
                "concat joins adapters' factors: use rank or energy instead"
            )


def export(
    plan: Plan, target: Target | None, scale: float, *, single: bool = False, quiet: bool = False
) -> tuple[dict, dict]:
    """Write lora/ for a committed model/; returns (outputs, the manifest's `lora` section).

    target None: the exact concatenated adapter of Task Arithmetic over adapters (`scale` its alpha);
    else a truncated SVD of every changed linear weight of model/ - base."""
    config = plan.config
    options = config.storage.options()
    output = config.output
    fan_in_fan_out = _model_type(plan, options) in CONV1D_MODEL_TYPES
    if single:  # model/ as one file
        model = dict(read_header(join(output, SINGLE_FILE), options).tensors)
    else:
        model = {}
        for shard in plan.shards:
            model |= read_header(join(output, shard.model_file()), options).tensors
    if target is None:
        parts = [concat_factors([cp.tensors for cp in plan.tasks], scale, fan_in_fan_out, options)]
    else:
        specs = [
            PartSpec(
                model=tuple(model[job.name] for job in shard.tensors),
                base={job.name: plan.base.tensors[job.name] for job in shard.tensors},
                target=target,
                fan_in_fan_out=fan_in_fan_out,
                storage=options,
            )
            for shard in plan.shards
        ]
        parts = runtime.run_tasks(
            export_part, [(s,) for s in specs], desc="lora out (SVD)", sizes=[s.base_bytes for s in specs], quiet=quiet
        )
    tensors: dict = {}
    targets: dict[str, tuple[int, float]] = {}
    changed: list[str] = []
    for part in parts:
        tensors |= part["tensors"]
        targets |= part["targets"]
        changed += part["changed"]

    # A target's bias travels whole (PEFT's bias "lora_only"); any other changed parameter makes its
    # module a modules_to_save, every parameter of it saved whole, and no longer a LoRA target.
    keep = sorted({module_of(n)[0] for n in changed if not (module_of(n)[0] in targets and module_of(n)[1] == "bias")})
    for module in keep:
        if targets.pop(module, None) is not None:
            tensors.pop(f"{PREFIX}{module}.lora_A.weight")
            tensors.pop(f"{PREFIX}{module}.lora_B.weight")
    biases = [n for n in changed if module_of(n)[0] in targets]
    whole = [n for n in model if module_of(n)[0] in set(keep) and model[n].dtype in FLOAT_CODES]
    saved = whole_tensors(biases + whole, model, options)
    for name in biases:
        module, _ = module_of(name)
        tensors[f"{PREFIX}{module}.base_layer.bias"] = saved[name]
    for name in whole:
        tensors[f"{PREFIX}{name}"] = saved[name]

    ranks = Counter(r for r, _ in targets.values())
    r = ranks.most_common(1)[0][0] if ranks else 1
    pattern = {re.escape(m): k for m, (k, _) in sorted(targets.items()) if k != r}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": redact(plan.base.uri),
        "r": r,
        "lora_alpha": r,  # scaling 1: B @ A is the merged delta as it is
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(targets),
        "modules_to_save": keep or None,
        "bias": "lora_only" if biases else "none",
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    store = storage_for(output, options)
    ordered = {k: tensors[k] for k in sorted(tensors)}
    outputs = {
        "lora/adapter_model.safetensors": _put(store, output, "lora/adapter_model.safetensors", save(ordered)),
        "lora/adapter_config.json": _put(
            store, output, "lora/adapter_config.json", json.dumps(adapter_config, indent=2).encode()
        ),
    }
    errors = [e for _, e in targets.values()]
    section = {
        "lora": {
            "rank": "concat" if target is None else target.rank,
            "energy": None if target is None else target.energy,
            "targets": len(targets),
            "modules_to_save": keep,
            "parameters": sum(t.numel() for t in tensors.values()),
            "max_relative_error": max(errors, default=0.0),
            "relative_error": {m: round(e, 8) for m, (_, e) in sorted(targets.items())},
            "ranks": {m: k for m, (k, _) in sorted(targets.items())},
        }
    }
    return outputs, section
