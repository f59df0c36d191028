"""Tests for the tiny offline model-family builder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import mergekit_prodistill  # noqa: E402
from mergekit_prodistill.tiny import ARCHITECTURES, ModelSpec, build_tiny_family  # noqa: E402

# The CLI subprocess must import the same copy of the package as this process.
PACKAGE_PARENT = Path(mergekit_prodistill.__file__).resolve().parents[1]


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def _digest(model_dir: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(model_dir).glob("*.safetensors"))}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_family(root / arch, arch=arch, n_experts=3) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_and_reload(families, arch):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    fam = families[arch]
    assert len(fam.experts) == 3 and len(fam.calibration) == 3
    for d in [fam.base, *fam.experts]:
        shards = list(d.glob("model-*.safetensors"))
        assert len(shards) > 1
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {s.name for s in shards}
        assert (d / "tokenizer.json").is_file() and (d / "config.json").is_file()

    tok = AutoTokenizer.from_pretrained(fam.base)
    enc = tok("What is 17 plus 25?")
    assert enc.input_ids[0] == tok.bos_token_id == 1
    assert tok("What is 17 plus 25?", add_special_tokens=False).input_ids[0] != tok.bos_token_id
    assert tok.eos_token_id == 2 and tok.pad_token_id == 3 and tok.unk_token_id == 0
    assert tok.decode(enc.input_ids, skip_special_tokens=True) == "What is 17 plus 25?"

    # transformers' default attention (Gemma2 has no sdpa).
    # By the Auto class a user would load it with (the causal LM one where transformers
    # maps the config to the class the config names, else the image-text one).
    config = transformers.AutoConfig.from_pretrained(fam.base)
    auto = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING and \
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__ == config.architectures[0] \
        else transformers.AutoModelForImageTextToText
    model = auto.from_pretrained(fam.base, dtype=torch.float32)
    assert type(model).__name__ == json.loads((fam.base / "config.json").read_text())["architectures"][0]
    assert model.config.get_text_config().vocab_size == len(tok)
    # Reloaded weights equal what was written (a mixture of experts' fused tensors as
    # transformers saves them: one matrix per expert).
    from transformers.core_model_loading import revert_weight_conversion

    saved = _tensors(fam.base)
    state = revert_weight_conversion(model, model.state_dict())
    for k, v in saved.items():
        assert torch.equal(state[k], v), k

    batch = tok(["Write a function that reverses a list", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch.input_ids.shape and logits.shape[-1] == len(tok)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_experts_differ_everywhere(families, arch):
    fam = families[arch]
    base = _tensors(fam.base)
    experts = [_tensors(e) for e in fam.experts]
    for k, b in base.items():
        for e in experts:
            assert e[k].shape == b.shape
            assert not torch.equal(e[k], b), k
            # Small perturbation relative to the tensor's spread (its size, for a scalar
            # such as Gemma 4's layer scalar).
            spread = b.std() if b.numel() > 1 else b.abs().max()
            assert (e[k] - b).std(correction=0) < 0.2 * spread + 1e-6, k
        assert not torch.equal(experts[0][k], experts[1][k]), k
        if k.endswith("norm.weight"):
            assert not torch.allclose(b, torch.ones_like(b)), k
        if k.endswith(".bias"):
            assert b.abs().sum() > 0, k


def test_arch_specifics(families):
    cfg = {a: json.loads((families[a].base / "config.json").read_text()) for a in ARCHITECTURES}
    keys = {a: set(_tensors(families[a].base)) for a in ARCHITECTURES}

    assert cfg["llama"]["tie_word_embeddings"] is False and "lm_head.weight" in keys["llama"]
    assert cfg["llama"]["num_key_value_heads"] < cfg["llama"]["num_attention_heads"]
    assert cfg["qwen3"]["tie_word_embeddings"] is True and "lm_head.weight" not in keys["qwen3"]
    assert any(k.endswith("self_attn.q_norm.weight") for k in keys["qwen3"])
    assert cfg["qwen2"]["sliding_window"] == 6
    assert "sliding_attention" in cfg["qwen2"]["layer_types"]
    assert "full_attention" in cfg["qwen2"]["layer_types"]
    assert any(k.endswith("self_attn.q_proj.bias") for k in keys["qwen2"])
    assert cfg["mistral"]["sliding_window"] == 6
    for arch in ("gemma", "gemma2", "gemma3"):  # Gemma checkpoints tie the LM head
        assert cfg[arch]["tie_word_embeddings"] is True and "lm_head.weight" not in keys[arch]
    assert cfg["gemma2"]["attn_logit_softcapping"] and cfg["gemma2"]["final_logit_softcapping"]
    assert set(cfg["gemma3"]["layer_types"]) == {"sliding_attention", "full_attention"}
    rope = cfg["gemma3"]["rope_parameters"]
    assert rope["sliding_attention"]["rope_theta"] != rope["full_attention"]["rope_theta"]
    assert cfg["granite"]["embedding_multiplier"] != 1 and cfg["granite"]["logits_scaling"] != 1
    assert not any(k.endswith(".bias") for k in keys["granite"])


def test_sliding_window_matters(families):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = families["mistral"]
    tok = AutoTokenizer.from_pretrained(fam.base)
    windowed = AutoModelForCausalLM.from_pretrained(fam.base, attn_implementation="sdpa")
    full = AutoModelForCausalLM.from_pretrained(fam.base, attn_implementation="sdpa", sliding_window=None)
    ids = tok("Write a Python function that merges two sorted lists. Add type hints.", return_tensors="pt")
    assert ids.input_ids.shape[1] > 6
    with torch.no_grad():
        a, b = windowed(**ids).logits, full(**ids).logits
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-4)


def test_calibration_files(families):
    from transformers import AutoTokenizer

    fam = families["llama"]
    tok = AutoTokenizer.from_pretrained(fam.base)
    texts = []
    for path in fam.calibration:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(lines) == 32 and all(set(x) == {"text"} for x in lines)
        lens = [len(tok(x["text"]).input_ids) for x in lines]
        assert min(lens) >= 5 and max(lens) <= 32 and len(set(lens)) > 3
        texts.append({x["text"] for x in lines})
    assert not (texts[0] & texts[1]) and not (texts[1] & texts[2])


def test_determinism(tmp_path):
    a = build_tiny_family(tmp_path / "a", arch="qwen2", n_experts=2)
    b = build_tiny_family(tmp_path / "b", arch="qwen2", n_experts=2)
    for da, db in zip([a.base, *a.experts], [b.base, *b.experts]):
        assert _digest(da) == _digest(db)
    for ca, cb in zip(a.calibration, b.calibration):
        assert ca.read_bytes() == cb.read_bytes()
    c = build_tiny_family(tmp_path / "c", arch="qwen2", n_experts=2, seed=1)
    assert _digest(a.base) != _digest(c.base)


def test_options(tmp_path):
    fam = build_tiny_family(tmp_path / "f", arch="llama", n_experts=1,
                            model=ModelSpec(tie_embeddings=True), prompts_per_expert=5)
    assert "lm_head.weight" not in _tensors(fam.base)
    assert len(fam.calibration[0].read_text().splitlines()) == 5
    with pytest.raises(ValueError):
        build_tiny_family(tmp_path / "g", arch="gpt2")


def test_recipe(families):
    fam = families["llama"]
    doc = yaml.safe_load(fam.recipe(epochs=5, lr=0.05))
    assert doc["merge_method"] == "prodistill" and doc["dtype"] == "float32"
    assert doc["base_model"] == str(fam.base) and Path(doc["base_model"]).is_absolute()
    assert [m["model"] for m in doc["models"]] == [str(e) for e in fam.experts]
    assert [m["parameters"]["calibration"] for m in doc["models"]] == [str(c) for c in fam.calibration]
    assert doc["parameters"] == {"epochs": 5, "lr": 0.05}

    doc = yaml.safe_load(fam.recipe("task_arithmetic", weight=0.3, normalize=True))
    assert [m["parameters"] for m in doc["models"]] == [{"weight": 0.3}] * 3
    assert doc["parameters"] == {"normalize": True}

    assert "base_model" not in yaml.safe_load(fam.recipe("linear"))


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_recipe_runs_in_mergekit(families, tmp_path, method):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM

    fam = families["qwen3"]
    config = MergeConfiguration.model_validate(yaml.safe_load(fam.recipe(method, weight=0.5)))
    run_merge(config, str(tmp_path / "out"), MergeOptions(lazy_unpickle=False, quiet=True))
    merged = _tensors(tmp_path / "out")
    base = _tensors(fam.base)
    assert set(merged) == set(base)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_PARENT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "example"
    r = subprocess.run(
        [sys.executable, "-m", "mergekit_prodistill.tiny", str(out), "--arch", "qwen3", "--experts", "3"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load((out / "recipe.yml").read_text())
    assert doc["parameters"] == dict(epochs=5, lr=0.05, shots=16, batch_size=8, max_length=64, init=0.5)
    assert len(doc["models"]) == 3
    assert "recipe.yml" in r.stdout
