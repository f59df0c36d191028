"""Bad input is refused before any weight is read: one clear line, nothing written."""

import json
import logging
import shutil

import pytest
import torch
import transformers
import yaml
from mergekit.config import MergeConfiguration

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.inputs import calibration, sources
from mergekit_prodistill.models.families import FAMILIES, check_supported
from mergekit_prodistill.models.weight_units import WeightUnits
from mergekit_prodistill.recipe import parse_recipe
from mergekit_prodistill.tiny import ModelSpec

from helpers import BIN, load_tensors, merge, recipe, refused, run_cli

# --------------------------------------------------------------------------- calibration


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda d: d / "missing.jsonl", r"calibration path .*missing.jsonl does not exist"),
        (lambda d: _write(d / "empty.jsonl", b"\n  \n"), r"empty.jsonl holds no prompts"),
        (lambda d: d, r"calibration folder .* holds no prompt files"),
        (lambda d: _write(d / "latin1.txt", "caf\u00e9\n".encode("latin-1")),
         r"latin1.txt is not UTF-8 text \(byte 3"),
        (lambda d: _write(d / "bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n'),
         r"bad.jsonl:3: not valid JSON"),
        (lambda d: _write(d / "num.jsonl", b'{"text": "a"}\n\n42\n'),
         r"num.jsonl:3: expected a string or an object with a 'text' / 'prompt' / 'instruction'"),
    ],
    ids=["missing", "empty", "empty-folder", "not-utf8", "malformed-jsonl", "wrong-record"],
)
def test_calibration_file_errors(families, tmp_path, no_weight_reads, make, match):
    doc = recipe(families("llama", 2))
    (tmp_path / "prompts").mkdir()
    doc["models"][1]["parameters"]["calibration"] = str(make(tmp_path / "prompts"))
    refused(doc, tmp_path / "out", match)


def test_unreadable_calibration_file(families, tmp_path, no_weight_reads, monkeypatch):
    # Root reads any file whatever its mode, so simulate the refusal the OS would give.
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path).endswith("expert_0.jsonl"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources, "open", deny, raising=False)
    refused(recipe(families("llama", 2)), tmp_path / "out",
            r"expert_0.jsonl cannot be read: Permission denied")


def _with_unreadable_tokenizer(expert):
    """Give ``expert`` a SentencePiece-style vocabulary; transformers loads a qwen2 model's
    tokenizer as Qwen2Tokenizer, whose byte-level text matches none of its entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mergekit_prodistill.tiny import SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "\u2581What", "\u2581is"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    for f in expert.glob("tokenizer*"):
        f.unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>").save_pretrained(expert)
    return expert


def test_prompt_without_tokens_is_one_line_from_plan_and_merge(families, tmp_path, no_weight_reads):
    fam = families("qwen2", 2)
    expert = _with_unreadable_tokenizer(_copy_model(fam.experts[1], tmp_path / "expert"))
    doc = _with_expert(recipe(fam, shots=4), 1, expert)
    first = sources.read_prompts(str(fam.calibration[1]))
    message = refused(doc, tmp_path / "out", r"model .*expert: its tokenizer \(Qwen2Tokenizer\) "
                                             r"turns the calibration prompt '.*' into no tokens")
    assert any(p[:40] in message for p in first)
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(doc))
    for command in (["plan", path], [path, tmp_path / "out"]):
        proc = run_cli(BIN / "mergekit-prodistill", *command, check=False)
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert line == f"mergekit-prodistill: error: {message}"
    assert not (tmp_path / "out").exists()


def _load_calibration(fam, caplog, **params):
    config = MergeConfiguration.model_validate(recipe(fam, **params))
    with caplog.at_level(logging.WARNING, logger="mergekit_prodistill"):
        return calibration.load_for_experts(parse_recipe(config), False, seed=0)


def test_fewer_prompts_than_shots_warns_and_uses_them_all(families, caplog):
    fam = families("llama", 2)  # 32 prompts per expert
    calib = _load_calibration(fam, caplog, shots=40, batch_size=8)
    assert calib.prompts == [32, 32]
    assert "holds 32 prompts, fewer than shots=40: using all of them" in caplog.text
    caplog.clear()
    assert _load_calibration(fam, caplog, shots=8).prompts == [8, 8]
    assert "fewer than shots" not in caplog.text


def test_prompts_longer_than_max_length_are_cut_with_a_warning(families, caplog):
    fam = families("llama", 2)
    # Alpaca's header alone is longer than 16 tokens: every prompt loses its ending.
    config = recipe(fam, max_length=16, shots=8, continue_tokens=0)  # the prompts alone
    config["models"][0]["parameters"]["template"] = "alpaca"
    config = MergeConfiguration.model_validate(config)
    with caplog.at_level(logging.WARNING, logger="mergekit_prodistill"):
        calib = calibration.load_for_experts(parse_recipe(config), False, seed=0)
    assert "all 8 prompts are longer than max_length=16 tokens after templating" in caplog.text
    assert "'### Response:'" in caplog.text
    assert max(b.input_ids.shape[1] for b in calib.batches[0]) == 16

    caplog.clear()
    calibration.warn_if_truncated("f.jsonl", "{prompt}", [5, 20, 9], 10)
    assert "1 of 3 prompts are longer than max_length=10" in caplog.text
    caplog.clear()
    calibration.warn_if_truncated("f.jsonl", "{prompt}", [5, 10], 10)
    assert not caplog.text


# --------------------------------------------------------------------------- the models


def _copy_model(src, dst, drop=()):
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def _with_expert(doc, index, path):
    doc["models"][index]["model"] = str(path)
    return doc


def test_model_folder_missing_or_without_weights(families, tmp_path, no_weight_reads):
    fam = families("llama", 2)
    doc = recipe(fam)
    doc["base_model"] = str(tmp_path / "nowhere")
    refused(doc, tmp_path / "out", r"model .*nowhere: folder .*nowhere does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((fam.base / "config.json").read_text())
    refused(_with_expert(recipe(fam), 0, empty), tmp_path / "out",
            r"model .*empty: no model.safetensors or model.safetensors.index.json in")


def test_hub_id_that_cannot_be_fetched(families, tmp_path, no_weight_reads, monkeypatch):
    import huggingface_hub.constants

    # Read once at import; set it here so the test never waits on a network timeout.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refused(_with_expert(recipe(families("llama", 2)), 0, "nobody/no-such-model"),
            tmp_path / "out", r"no folder nobody/no-such-model here, and the Hugging Face Hub "
                              r"could not provide it")


def test_missing_or_truncated_shard(families, tmp_path, no_weight_reads):
    fam = families("llama", 2)
    index = json.loads((fam.experts[0] / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]

    gone = _copy_model(fam.experts[0], tmp_path / "gone", drop=[shard])
    refused(_with_expert(recipe(fam), 0, gone), tmp_path / "out",
            rf"shard {shard} listed in model.safetensors.index.json is missing")

    cut = _copy_model(fam.experts[0], tmp_path / "cut")
    data = (cut / shard).read_bytes()
    (cut / shard).write_bytes(data[: len(data) - 100])
    refused(_with_expert(recipe(fam), 0, cut), tmp_path / "out",
            rf"{shard} is truncated \({len(data) - 100} bytes, its header needs {len(data)}\)")


def _stablelm_model(folder):
    """A tiny StableLM checkpoint: a family mergekit merges and prodistill does not run."""
    import transformers

    from mergekit_prodistill.tiny import build_tokenizer

    config = transformers.StableLmConfig(vocab_size=768, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=3, architectures=["StableLmForCausalLM"])
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def test_unsupported_family_is_refused_in_one_line(families, tmp_path, no_weight_reads):
    fam = families("llama", 2)
    stablelm = _stablelm_model(tmp_path / "stablelm")
    doc = recipe(fam)
    doc["base_model"] = str(stablelm)
    for i in range(len(doc["models"])):
        _with_expert(doc, i, _copy_model(stablelm, tmp_path / f"stablelm-expert-{i}"))
    message = refused(doc, tmp_path / "out", r"architecture StableLmForCausalLM is not supported")
    assert message.startswith(f"model {stablelm}: ")
    assert "LlamaForCausalLM" in message and "Gemma2ForCausalLM" in message
    # The plan command reads only configs and prompts, and refuses it the same way.
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(doc))
    proc = run_cli(BIN / "mergekit-prodistill", "plan", path, check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"mergekit-prodistill: error: {message}"


UNCHECKED = "its blocks are not yet checked against its own forward"


@pytest.mark.parametrize("model_type,architecture,missing", [
    ("olmoe", "OlmoeForCausalLM", UNCHECKED),
    ("stablelm", "StableLmForCausalLM", UNCHECKED),
    ("llava", "LlavaForConditionalGeneration", "its language model (LlamaForCausalLM) "
     "is, but the multimodal checkpoint is not yet checked against its own forward"),
    ("gemma3n", "Gemma3nForConditionalGeneration",
     "its language model (Gemma3nForCausalLM) is not one of the families below"),
    ("qwen2_vl", "Qwen2VLForConditionalGeneration",
     "its language model (qwen2_vl_text) is not one of the families below"),
])
def test_an_unsupported_family_is_refused_naming_what_is_missing(model_type, architecture,
                                                                 missing):
    config = transformers.AutoConfig.for_model(model_type).to_dict()
    with pytest.raises(ProDistillError) as refusal:
        check_supported([architecture], config, "model m")
    assert str(refusal.value) == (f"model m: architecture {architecture} is not supported: "
                                  f"{missing}; prodistill supports {', '.join(FAMILIES)}")


def test_gemma4_is_accepted_with_per_layer_inputs_and_shared_keys_not_attending_both_ways():
    # Gemma 4's config class defaults to per-layer inputs (E2B/E4B), which run beside
    # shared keys and values (the tiny gemma4_e2b family).
    config = transformers.AutoConfig.for_model("gemma4_text", num_kv_shared_layers=2).to_dict()
    check_supported(["Gemma4ForCausalLM"], config)
    # Bidirectional attention within images leaves text causal; over everything it does not.
    check_supported(["Gemma4ForCausalLM"], {**config, "use_bidirectional_attention": "vision"})
    with pytest.raises(ProDistillError, match="with use_bidirectional_attention is not supported"):
        check_supported(["Gemma4ForCausalLM"], {**config, "use_bidirectional_attention": "all"})


def test_a_multimodal_checkpoint_without_a_layout_of_its_language_model_is_refused():
    # Neither mergekit's modular layout (a text decoder) nor its inferred one (a module per
    # stack of layers): nothing tells the language model's blocks from other tensors.
    from mergekit.architecture import ConfiguredModelArchitecture, arch_info_for_config

    llama = arch_info_for_config(transformers.LlamaConfig(architectures=["LlamaForCausalLM"]))
    config = transformers.AutoConfig.for_model("gemma3", architectures=["Gemma3ForConditionalGeneration"])
    with pytest.raises(ProDistillError, match=r"^architecture Gemma3ForConditionalGeneration: "
                       r"mergekit's layout of it names no stack of layers "
                       r"'model\.language_model\.layers', so its language model's blocks cannot "
                       r"be told apart$"):
        WeightUnits(ConfiguredModelArchitecture(info=llama, config=config))


def test_a_tensor_the_layout_leaves_out_is_refused_not_dropped(families, tmp_path,
                                                               monkeypatch, no_weight_reads):
    fam = families("llama", 2)
    listed = WeightUnits.layer_weights

    def without_a_norm(self, index):
        return [w for w in listed(self, index) if "input_layernorm" not in w.name]

    monkeypatch.setattr(WeightUnits, "layer_weights", without_a_norm)
    refused(recipe(fam), tmp_path / "out", r"^the base model's tensors "
            r"model\.layers\.0\.input_layernorm\.weight, model\.layers\.1\.input_layernorm\.weight "
            r"\(2\) are not in mergekit's layout of LlamaForCausalLM, so the merge would drop them$")


def test_a_kind_of_layer_not_run_block_by_block_is_named():
    config = {"layer_types": ["conv", "full_attention"]}
    with pytest.raises(ProDistillError, match=r"^m: architecture X4ForCausalLM is not supported: "
                       r"its conv layers are not run block by block yet; "):
        check_supported(["X4ForCausalLM"], config, "m")


def test_bidirectional_attention_is_refused(families, tmp_path, no_weight_reads):
    fam = families("gemma3", 2)
    bidirectional = _copy_model(fam.experts[0], tmp_path / "bidirectional")
    config = json.loads((bidirectional / "config.json").read_text())
    config["use_bidirectional_attention"] = True
    (bidirectional / "config.json").write_text(json.dumps(config))
    refused(_with_expert(recipe(fam), 0, bidirectional), tmp_path / "out",
            r"model .*bidirectional: Gemma3ForCausalLM with use_bidirectional_attention is "
            r"not supported")


def test_expert_of_another_architecture(families, tmp_path, no_weight_reads):
    doc = _with_expert(recipe(families("llama", 2)), 1, families("mistral", 2).experts[1])
    refused(doc, tmp_path / "out",
            r"model .* is MistralForCausalLM but the base model is LlamaForCausalLM")


def test_expert_with_other_layer_count(families, tmp_path, no_weight_reads):
    doc = _with_expert(recipe(families("llama", 2)), 0,
                       families("llama", 2, model=ModelSpec(num_layers=3)).experts[0])
    refused(doc, tmp_path / "out", r"model .* has 3 layers but the base model has 2")


def test_expert_with_other_tensor_shape(families, tmp_path, no_weight_reads):
    other = families("llama", 2, model=ModelSpec(intermediate_size=96)).experts[0]
    refused(_with_expert(recipe(families("llama", 2)), 0, other), tmp_path / "out",
            r"tensor model.layers.0.mlp.gate_proj.weight: model .* has shape \(96, 64\) but "
            r"the base model has \(128, 64\)")


def test_expert_missing_a_tensor(families, tmp_path, no_weight_reads):
    fam = families("llama", 2)
    from safetensors.torch import load_file, save_file

    broken = _copy_model(fam.experts[0], tmp_path / "broken")
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = broken / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    refused(_with_expert(recipe(fam), 0, broken), tmp_path / "out",
            rf"model .*broken has no tensor {name}")


def test_a_stored_copy_of_a_tied_head_is_not_taken_for_a_dropped_tensor(families, tmp_path):
    # Gemma ties its LM head to the embedding; mergekit's gemma layout has no lm_head. A
    # checkpoint that stores the head anyway loses nothing when the merge leaves it out.
    fam = families("gemma", 2)
    from safetensors.torch import load_file, save_file

    base = _copy_model(fam.base, tmp_path / "base")
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = base / index["weight_map"]["model.embed_tokens.weight"]
    tensors = load_file(shard)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = shard.name
    index_path.write_text(json.dumps(index))
    doc = recipe(fam, epochs=0)
    doc["base_model"] = str(base)
    merge(yaml.safe_dump(doc), tmp_path / "out")
    assert "lm_head.weight" not in load_tensors(tmp_path / "out")


def test_remote_code_needs_the_flag(families, tmp_path, no_weight_reads):
    fam = families("llama", 2)
    custom = _copy_model(fam.experts[0], tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="tiny_custom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_tiny.py").write_text("raise SystemExit('remote code ran')\n")
    refused(_with_expert(recipe(fam), 0, custom), tmp_path / "out",
            r"TinyCustomForCausalLM is not part of transformers and its config.json points to "
            r"code shipped with the model \(auto_map\); pass --trust-remote-code")


def _pickled_copy(src, dst):
    """The same model saved as a pickled pytorch_model.bin instead of safetensors."""
    from safetensors.torch import load_file

    dst.mkdir()
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(f))
    torch.save(state, dst / "pytorch_model.bin")
    for f in src.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, dst / f.name)
    return dst


def test_pickled_weights_only_with_explicit_trust(families, tmp_path, no_weight_reads, monkeypatch):
    fam = families("llama", 2)
    pickled = _pickled_copy(fam.experts[0], tmp_path / "pickled")
    doc = _with_expert(recipe(fam, epochs=0, shots=4), 0, pickled)
    refused(doc, tmp_path / "out", r"model .*pickled has only pickled weights "
                                   r"\(pytorch_model.bin\), which can run code when loaded; "
                                   r"convert them to safetensors, or pass --trust-remote-code")
    refused(doc, tmp_path / "out", r"only pickled weights", lazy_unpickle=True)


def test_pickled_weights_merge_the_same_when_trusted(families, tmp_path):
    fam = families("llama", 2)
    pickled = _pickled_copy(fam.experts[0], tmp_path / "pickled")
    doc = _with_expert(recipe(fam, epochs=0, shots=4), 0, pickled)
    a = load_tensors(merge(yaml.safe_dump(doc), tmp_path / "a", trust_remote_code=True))
    b = load_tensors(merge(fam.recipe("prodistill", epochs=0, shots=4), tmp_path / "b"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- commands


def test_model_error_is_one_line_from_mergekit_yaml(families, tmp_path):
    # mergekit-prodistill prints the same line (test_cli checks both commands).
    other = families("llama", 2, model=ModelSpec(intermediate_size=96)).experts[0]
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(_with_expert(recipe(families("llama", 2)), 0, other)))
    out = tmp_path / "out"
    proc = run_cli(BIN / "mergekit-yaml", path, out, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "mergekit-prodistill: error: tensor model.layers.0.mlp.gate_proj.weight: model "), lines
    assert not out.exists()


def test_experts_stored_one_by_one_that_transformers_does_not_fuse_are_refused_first(
        tmp_path, monkeypatch, no_weight_reads, caplog):
    # transformers fuses Qwen3.5-MoE's experts under its text model's type alone: a
    # multimodal checkpoint storing them one by one is not what its blocks are built from
    # (the Hub's store them fused, as the tiny family does).
    from mergekit_prodistill import tiny

    monkeypatch.setattr(tiny, "HUB_FORMAT", set())
    fam = tiny.build_tiny_family(tmp_path / "family", arch="qwen3_5_moe_vl", n_experts=2)
    assert "model.language_model.layers.0.mlp.experts.0.up_proj.weight" in load_tensors(fam.base)
    refused(yaml.safe_load(fam.recipe("prodistill", epochs=1, shots=4)), tmp_path / "out",
            r"^model .*base, block 0: block parameters \['mlp.experts.down_proj', "
            r"'mlp.experts.gate_up_proj'\] have no tensor in the checkpoint layout; the "
            "checkpoint does not store the tensors transformers builds this model's blocks from")
    # mergekit's notices that it infers the layout (no JSON of the architecture) are not
    # passed on: that is expected of every family not on its list.
    assert "No JSON architecture" not in caplog.text and "Inferred" not in caplog.text
