"""The flagship recipe validates offline, with the prompt formats its experts were trained
with; the README shows that very recipe, and the documentation's relative links resolve."""

import re
import subprocess
from pathlib import Path

import yaml
from mergekit.config import MergeConfiguration

from mergekit_prodistill.inputs.templates import PRESETS, resolve_template
from mergekit_prodistill.models.model_files import hub_id
from mergekit_prodistill.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
FLAGSHIP = REPO / "examples" / "wizard-13b" / "recipe.yml"
EVALUATE = REPO / "examples" / "wizard-13b" / "evaluate.sh"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_flagship_recipe_validates_offline():
    config = MergeConfiguration.model_validate(yaml.safe_load(FLAGSHIP.read_text()))
    recipe = parse_recipe(config)
    assert str(recipe.base) == "meta-llama/Llama-2-13b-hf" and recipe.dtype == "float16"
    experts = {str(e.model): e.params for e in recipe.experts}
    assert list(experts) == ["WizardLMTeam/WizardLM-13B-V1.2", "WizardLMTeam/WizardMath-13B-V1.0",
                             "layoric/llama-2-13b-code-alpaca"]
    chat, maths, code = experts.values()
    assert resolve_template(chat.template).startswith("A chat between a curious user")
    assert resolve_template(maths.template).endswith("### Response: Let's think step by step.")
    assert "Create a Python script for this problem:" in resolve_template(code.template)
    assert {chat.template, maths.template, code.template} <= set(PRESETS)
    # Prompts come from training data, named by Hub id and column.
    assert (maths.dataset, maths.subset, maths.split, maths.field) == (
        "openai/gsm8k", "main", "train", "question")
    assert all(p.dataset and p.field and p.calibration is None for p in experts.values())
    assert recipe.params.shots == 64 and recipe.params.max_length == 512
    # Every model is a Hub id, so the card's base_model lists all four.
    assert all(hub_id(m) == m for m in [str(recipe.base), *experts])


def test_readme_shows_the_flagship_recipe():
    readme = (REPO / "README.md").read_text()
    shown = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", readme, re.S)
             if "merge_method" in block]
    assert shown == [yaml.safe_load(FLAGSHIP.read_text())]


def test_relative_links_in_the_documentation_resolve():
    for page in DOCS:
        prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", prose):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_evaluation_script_is_valid_bash_and_scores_the_flagship_experts():
    subprocess.run(["bash", "-n", str(EVALUATE)], check=True)
    script = EVALUATE.read_text()
    experts = [m["model"] for m in yaml.safe_load(FLAGSHIP.read_text())["models"]]
    assert all(expert in script for expert in experts)
    assert "gsm8k,minerva_math,humaneval,mbpp" in script
    # The code tasks run only with both of these: lm_eval's gate and evaluate's code_eval.
    assert "--confirm_run_unsafe_code" in script and "export HF_ALLOW_CODE_EVAL=1" in script


def test_documentation_names_todays_hf_commands():
    texts = [*DOCS, *(REPO / "examples").rglob("*.*"), *(REPO / "mergekit_prodistill").rglob("*.py")]
    for path in texts:
        assert "huggingface-cli" not in path.read_text(), f"{path}: use the `hf` command"
