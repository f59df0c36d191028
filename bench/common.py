"""Helpers of the bench scripts: model families written block by block, measured merges.

`write_family` writes a base model and experts of any Llama-family shape as sharded
safetensors, one shard per decoder block, generating one tensor at a time: a 13B-shaped
family never needs more memory than its largest tensor. `merge` runs a recipe in a child
process (as a user would) and returns its wall time and ProDistill report.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
from safetensors.torch import save_file

from mergekit_prodistill.output.report import Report
from mergekit_prodistill.tiny import TinyFamily, build_tokenizer, make_prompts

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads=None,
                 vocab: int = 32000):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, max_position_embeddings=4096,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )


def tensor_groups(config):
    """Checkpoint tensor names and shapes, grouped into shards: embeddings, each block,
    then the final norm and LM head."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    groups = {}
    for name, param in skeleton.named_parameters():
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if parts[1] == "layers" else (
            "embed" if "embed" in name else "head")
        groups.setdefault(key, {})[name] = tuple(param.shape)
    return [groups["embed"]] + [groups[k] for k in sorted(groups) if k.startswith("layer")] \
        + [groups["head"]]


def randn(name: str, shape, seed: int) -> torch.Tensor:
    """Reproducible standard normal values for one named tensor."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919)
    return torch.randn(shape, generator=gen)


def write_family(root, config, n_experts: int, dtype=torch.bfloat16, prompts: int = 16,
                 expert_scale: float = 0.1, seed: int = 0, tau_std=None, tau_relative=None,
                 reuse: bool = False) -> TinyFamily:
    """Base + experts + prompts. An expert is each base tensor plus noise: expert_scale x
    the tensor's std, or, with ``tau_std``, noise of that std in every tensor, or, with
    ``tau_relative`` r, r |theta| N(0, 1) per element: each weight moved by a share r of
    its own size (small full fine-tunes move weights by ~1e-3 of their size). With
    ``reuse``, a family already complete under ``root`` is returned as it is."""
    root = Path(root)
    names = ["base"] + [f"expert_{i}" for i in range(n_experts)]
    family = TinyFamily(root, root / "base", [root / f"expert_{i}" for i in range(n_experts)],
                        [root / "calibration" / f"expert_{i}.jsonl" for i in range(n_experts)])
    if reuse and all(c.exists() for c in family.calibration):
        return family  # the prompts are written last
    tokenizer = build_tokenizer()
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        config.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    groups = tensor_groups(config)
    weight_map = {name: {} for name in names}
    for g, shapes in enumerate(groups):
        shard = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        # Norm weights near 1, everything else like a trained model's scale.
        base = {n: ((1 + 0.1 * randn(n, sh, seed)) if n.endswith("norm.weight")
                    else 0.02 * randn(n, sh, seed)).to(dtype) for n, sh in shapes.items()}
        save_file(base, root / "base" / shard, metadata={"format": "pt"})
        for i in range(n_experts):
            expert = {n: (t.float() + (tau_relative * t.float().abs() if tau_relative else
                                       tau_std or expert_scale * (0.1 if t.dim() == 1 else 0.02))
                          * randn(n, t.shape, seed + i + 1)).to(dtype) for n, t in base.items()}
            save_file(expert, root / f"expert_{i}" / shard, metadata={"format": "pt"})
            del expert
        for name in names:
            weight_map[name].update({n: shard for n in shapes})
        del base
    for name in names:
        with open(root / name / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map[name]}, f)
    (root / "calibration").mkdir(exist_ok=True)
    for i, path in enumerate(family.calibration):
        path.write_text("".join(json.dumps({"text": p}) + "\n" for p in make_prompts(i, prompts)))
    return family


def write_recipe(family: TinyFamily, path, method="prodistill", dtype="bfloat16", **params):
    text = family.recipe(method, **params).replace("dtype: float32", f"dtype: {dtype}")
    Path(path).write_text(text)
    return Path(path)


def child_env() -> dict:
    """Offline, with this checkout's package first on the path."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def run_command(command, *args) -> str:
    """Run one of the installed commands in a child process; return its output."""
    proc = subprocess.run([str(BIN / command), *map(str, args)], env=child_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{command} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def merge(command, recipe, out, *flags) -> Tuple[float, Optional[Report]]:
    """Run one merge in a child process; return its wall time and ProDistill report
    (None when the merge was not a ProDistill one)."""
    started = time.perf_counter()
    run_command(command, recipe, out, "--quiet", *flags)
    wall = time.perf_counter() - started
    try:
        return wall, Report.read(str(out))
    except FileNotFoundError:
        return wall, None


def held_out_ids(tokenizer_folder, expert: int, prompts: int = 16):
    """Token ids of prompts of expert ``expert``'s kind that no merge trains on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    return [torch.tensor([tokenizer(p)["input_ids"]]) for p in
            make_prompts(expert, prompts, seed=4242)]


@torch.no_grad()
def mean_kl(expert_folder, merged_folder, prompts, dtype=torch.float64, device="cpu") -> float:
    """Mean token KL(expert || merge), each model loaded from its files with
    ``AutoModelForCausalLM`` and run in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    def load(folder):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

    expert = load(expert_folder)
    teacher = [torch.log_softmax(expert(ids.to(device)).logits.double(), -1) for ids in prompts]
    del expert  # one model on the device at a time
    merged = load(merged_folder)
    total = tokens = 0.0
    for ids, p in zip(prompts, teacher):
        q = torch.log_softmax(merged(ids.to(device)).logits.double(), -1)
        total += float((p.exp() * (p - q)).sum())
        tokens += ids.shape[1]
    return total / tokens


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def planned_peak(recipe, **options) -> int:
    """The plan's predicted peak on the CPU for a recipe file (no weights read)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_prodistill.plan.planner import make_plan
    from mergekit_prodistill.recipe import parse_recipe

    config = MergeConfiguration.model_validate(yaml.safe_load(Path(recipe).read_text()))
    return make_plan(parse_recipe(config), MergeOptions(**options)).total("cpu")
