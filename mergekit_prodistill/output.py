"""Everything around the weights: staging, config, tokenizer, model card and report.

The whole output is written to a staging folder inside the target and moved into place
only when complete, so an interrupted merge never leaves a folder that looks finished.
"""

import json
import os
import resource
import shutil
import sys
import time

import torch
import yaml
from mergekit.card import generate_card

from mergekit_prodistill import __version__, integration

STAGING = ".prodistill-staging"
REPORT = "prodistill_report.json"
WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")


def start_staging(out_path: str) -> str:
    staging = os.path.join(out_path, STAGING)
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of an interrupted run
    os.makedirs(staging)
    return staging


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"peak_rss_bytes": rss * (1 if sys.platform == "darwin" else 1024)}
    if device.type == "cuda":
        peak["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak


def _local_paths_absolute(merge_config):
    """mergekit's card asks the Hub about relative paths; make existing local ones absolute."""

    def fix(ref):
        path = ref.model.path
        if os.path.exists(path) and not os.path.isabs(path):
            return ref.model_copy(update={"model": ref.model.model_copy(
                update={"path": os.path.abspath(path)})})
        return ref

    models = [m.model_copy(update={"model": fix(m.model)}) for m in merge_config.models]
    return merge_config.model_copy(update={
        "models": models,
        "base_model": fix(merge_config.base_model),
    })


def model_card(merge_config, config_source, name, report) -> str:
    card = generate_card(_local_paths_absolute(merge_config), config_source, name)
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    meta["tags"] = list(dict.fromkeys([*meta.get("tags", []), "prodistill"]))
    params = report["parameters"]
    lines = [
        "",
        "### ProDistill",
        "",
        "Element-wise merging coefficients were trained block by block so that each merged "
        "decoder block, fed the merged model's own activations, reproduces every expert's "
        "block on that expert's unlabeled calibration prompts "
        "([Xu et al., 2025](https://arxiv.org/abs/2502.12706)). Embeddings, the final norm "
        f"and the LM head were merged by task arithmetic with weight {params['init']}.",
        *(["", report["vocabulary"]] if report.get("vocabulary") else []),
        "",
        "| expert | calibration file | prompts | tokens |",
        "|---|---|---|---|",
        *[f"| {c['model']} | {c['file']} | {c['prompts']} | {c['tokens']} |"
          for c in report["calibration"]],
        "",
        "Hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in params.items())
        + f", seed={report['seed']}.",
        "",
        "| block | loss before | loss after |",
        "|---|---|---|",
        *[f"| {b['block']} | {b['loss_before']:.4g} | {b['loss_after']:.4g} |"
          for b in report["blocks"]],
        "",
        f"Merged with mergekit-prodistill {__version__} in {report['seconds']:.0f} s on "
        f"{report['device']}.",
        "",
    ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body + "\n".join(lines)


def finish(staging, out_path, merge_config, arch_info, options, config_source, recipe,
           calib, blocks, started, device, vocabulary):
    """Write config, tokenizer, card and report into the staging folder, then publish."""
    config_source = config_source or merge_config.to_yaml()
    cfg = integration.model_out_config(merge_config, arch_info, options.trust_remote_code)
    if vocabulary.tokenizer is not None:
        # A built vocabulary is always saved, and sets vocab_size, as mergekit does.
        integration.update_config_vocab(cfg, arch_info, vocabulary.tokenizer,
                                        pad_to_multiple_of=vocabulary.pad_to_multiple_of)
        integration.set_chat_template(vocabulary.tokenizer, merge_config)
        vocabulary.tokenizer.save_pretrained(staging)
    elif options.copy_tokenizer:
        integration.copy_tokenizer(merge_config, staging, options=options)
    cfg.save_pretrained(staging)
    integration.copy_tagalong_files(
        merge_config, staging, files=arch_info.tagalong_files or [], options=options
    )
    report = {
        "method": "prodistill",
        "version": __version__,
        "parameters": recipe.params.model_dump(),
        "seed": options.random_seed if options.random_seed is not None else 0,
        "device": str(device),
        "calibration": [
            {"model": str(e.model), "file": f, "prompts": n, "tokens": calib.tokens(i)}
            for i, (e, f, n) in enumerate(zip(recipe.experts, calib.files, calib.prompts))
        ],
        "vocabulary": vocabulary.summary,
        "blocks": blocks,
        "seconds": time.time() - started,
        **peak_memory(device),
    }
    with open(os.path.join(staging, REPORT), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    if options.write_model_card:
        card = model_card(merge_config, config_source, os.path.basename(os.path.abspath(out_path)), report)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)
        with open(os.path.join(staging, "mergekit_config.yml"), "w", encoding="utf-8") as f:
            f.write(config_source)
    publish(staging, out_path)


def publish(staging: str, out_path: str) -> None:
    """Move the finished files into ``out_path``, replacing weights of an older merge."""
    for name in os.listdir(out_path):
        if name.startswith(WEIGHT_PREFIXES):
            os.remove(os.path.join(out_path, name))
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out_path, name))
    os.rmdir(staging)
