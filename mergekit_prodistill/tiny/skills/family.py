"""Build (once) and cache a skill family: a base model and one expert per task of a suite.

The base is a small Llama pretrained on its suite's pretraining skills: in suite ``novel``
neighbouring string skills, so it knows the prompt format and much of the machinery but
none of the tasks; in suites ``competent`` and ``quick`` the tasks themselves, briefly, so
it is fair at each. Each expert is the base fully fine-tuned on one task. Everything is
saved as sharded safetensors with the tokenizer, as real checkpoints are, together with
one unlabeled calibration prompt file per task. A fingerprint of the settings names the cache folder, so
changing a setting rebuilds and an unchanged one reuses.

Training a model is chaotic: a last-bit difference in one matmul grows into a different
model within a few hundred steps. Which kernels torch picks depends on the CPU (ATen's
AVX2 or AVX-512 code, MKL's code path for the CPU's maker), so the build runs in a child
process with those choices pinned (:data:`PINNED`): the same models, bit for bit, on any
x86-64 CPU with the same torch, whatever thread count the caller uses.
"""

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
import yaml

from . import tasks, training
from .kernels import PINNED  # set before torch starts in the building process


@dataclass(frozen=True)
class BuildSettings:
    suite: str = "novel"
    architecture: str = "LlamaForCausalLM"  # or Qwen2ForCausalLM: attention biases
    hidden_size: int = 64
    intermediate_size: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    pretrain_steps: int = 800  # the length of the learning-rate schedule
    pretrain_stop: Optional[int] = None  # stop the base early, at this step of it
    pretrain_lr: float = 3e-3
    finetune_steps: int = 300
    finetune_lr: float = 3e-4
    # Fine-tuning steps of the experts that need more than finetune_steps (task -> steps).
    finetune_steps_of: Dict[str, int] = field(default_factory=dict)
    batch_size: int = 64
    train_examples: int = 20000
    calibration_prompts: int = 128
    test_examples: int = 300
    seed: int = 0
    # With a weight > 0 the base also reads prompts of every task, unanswered (one for
    # every 64 pretraining examples per task), and learns the prompts' tokens with that
    # weight besides the answers': like a pretrained LM, it has read questions it cannot
    # answer, and can write more of them.
    read_prompts: float = 0.0
    shard_size: str = "200KB"

    def fingerprint(self) -> str:
        """Names the cache: the settings and what else fixes the bits (torch, the CPU
        architecture)."""
        import torch

        key = {**asdict(self), "torch": torch.__version__.split("+")[0],
               "machine": platform.machine(), "pinned": PINNED}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


# The quick start's family: suite ``competent``'s recipe (a base stopped early, so fair at
# every task; experts a small, low learning-rate step from it) on three of its four tasks,
# with shorter fine-tuning and fewer test prompts, so that it builds in about a minute and
# a half on two CPU cores.
QUICK = BuildSettings(suite="quick", pretrain_steps=1200, pretrain_stop=800,
                      finetune_steps=300, finetune_lr=1e-4, test_examples=200)


@dataclass
class Checkpoints:
    root: Path
    base: Path
    experts: Dict[str, Path]  # task name -> checkpoint
    calibration: Dict[str, Path]  # task name -> prompt file
    settings: BuildSettings
    build_seconds: float  # when they were built
    reused: bool  # found in the cache by this run

    def recipe(self, method: str, parameters: Optional[Dict] = None,
               weight: Optional[float] = None, density: Optional[float] = None) -> str:
        """A mergekit YAML recipe that merges the experts onto the base, in float32.

        ProDistill's experts each get their calibration file; mergekit's methods give
        every expert ``weight`` (and ``density`` where given). ``parameters`` is the
        global block. mergekit's ``linear`` has no base model.
        """
        models = []
        for task, path in self.experts.items():
            if method == "prodistill":
                params = {"calibration": str(self.calibration[task])}
            else:
                params = {"weight": weight}
                if density is not None:
                    params["density"] = density
            models.append({"model": str(path), "parameters": params})
        doc = {"merge_method": method}
        if method != "linear":
            doc["base_model"] = str(self.base)
        doc["models"] = models
        if parameters:
            doc["parameters"] = dict(parameters)
        doc["dtype"] = "float32"
        return yaml.safe_dump(doc, sort_keys=False)


def _config(s: BuildSettings, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"LlamaForCausalLM": LlamaConfig, "Qwen2ForCausalLM": Qwen2Config}
    return config_class[s.architecture](
        vocab_size=len(tokenizer), hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=[s.architecture],
    )


def _save(model, tokenizer, path: Path, shard_size: str) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(path, max_shard_size=shard_size)
    tokenizer.save_pretrained(path)


def build(cache: Path, s: BuildSettings = BuildSettings(), log=print) -> Checkpoints:
    """The checkpoints for settings ``s``, built under ``cache`` unless already there
    (in a child process with the kernels pinned, see :data:`PINNED`)."""
    root = Path(cache) / f"models-{s.fingerprint()}"
    done = root / "build.json"
    names = [t.name for t in tasks.SUITES[s.suite].tasks]
    ckpt = lambda reused: Checkpoints(  # noqa: E731
        root, root / "base", {n: root / f"expert-{n}" for n in names},
        {n: root / "calibration" / f"{n}.jsonl" for n in names}, s,
        json.loads(done.read_text())["seconds"], reused,
    )
    if done.exists():
        log(f"reusing checkpoints in {root}")
        return ckpt(True)
    package_root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, **PINNED, "PYTHONPATH": os.pathsep.join(
        filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        [sys.executable, "-m", "mergekit_prodistill.tiny.skills.family", str(root),
         json.dumps(asdict(s))], env=env, stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        log(line.rstrip("\n"))
    if child.wait() != 0 or not done.exists():
        raise RuntimeError(f"building the skill family in {root} failed (exit {child.returncode})")
    return ckpt(False)


def _build_here(root: Path, s: BuildSettings, log=print) -> None:
    """Train and save the family into ``root``; run by :func:`build`'s child process."""
    from transformers import AutoModelForCausalLM

    assert all(os.environ.get(k) == v for k, v in PINNED.items()), "run through build()"
    torch.use_deterministic_algorithms(True)
    suite = tasks.SUITES[s.suite]
    done = root / "build.json"
    started = time.time()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    tokenizer = tasks.build_tokenizer(suite)
    splits = tasks.make_splits(suite, s.train_examples, s.calibration_prompts, s.test_examples,
                               s.seed)
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_config(_config(s, tokenizer), dtype=torch.float32)
    log("pretraining the base model")
    pretraining = tasks.pretraining_examples(suite, splits)
    if s.read_prompts:
        pretraining += [(task.prompt(x), None) for task in suite.tasks
                        for x in splits[task.name].train[:len(pretraining) // 64]]
    training.train(model, tokenizer, pretraining,
                   training.Schedule(s.pretrain_steps, s.pretrain_lr, s.batch_size, s.seed,
                                     stop=s.pretrain_stop), log=log, name="base",
                   prompt_loss=s.read_prompts)
    _save(model, tokenizer, root / "base", s.shard_size)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, task in enumerate(suite.tasks):
        log(f"fine-tuning the {task.name} expert")
        model.load_state_dict(base_state)
        training.train(model, tokenizer, tasks.examples(task, splits[task.name].train),
                       training.Schedule(s.finetune_steps_of.get(task.name, s.finetune_steps),
                                         s.finetune_lr, s.batch_size, s.seed + 1 + i),
                       log=log, name=task.name)
        _save(model, tokenizer, root / f"expert-{task.name}", s.shard_size)

    (root / "calibration").mkdir()
    for task in suite.tasks:
        with open(root / "calibration" / f"{task.name}.jsonl", "w", encoding="utf-8") as f:
            for inputs in splits[task.name].calibration:
                f.write(json.dumps({"text": task.prompt(inputs)}) + "\n")
    seconds = time.time() - started
    done.write_text(json.dumps({"settings": asdict(s), "seconds": seconds}, indent=2))


def held_out_sets(s: BuildSettings) -> Dict[str, list]:
    """(prompt, answer) pairs per task, never seen in training or calibration."""
    suite = tasks.SUITES[s.suite]
    splits = tasks.make_splits(suite, s.train_examples, s.calibration_prompts, s.test_examples,
                               s.seed)
    return {t.name: tasks.examples(t, splits[t.name].test) for t in suite.tasks}


if __name__ == "__main__":
    import transformers

    transformers.utils.logging.set_verbosity_error()
    _build_here(Path(sys.argv[1]), BuildSettings(**json.loads(sys.argv[2])),
                log=lambda message: print(message, flush=True))
