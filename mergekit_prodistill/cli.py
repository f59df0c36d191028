"""``mergekit-prodistill RECIPE OUT``: the same flags as ``mergekit-yaml``."""

import sys

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_prodistill.errors import ProDistillError, one_line


@click.command("mergekit-prodistill", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@add_merge_options
def main(merge_options: MergeOptions, config_file: str, out_path: str):
    """Merge the experts of a prodistill recipe into its base model."""
    from mergekit_prodistill.distill import run_prodistill

    merge_options.apply_global_options()
    try:
        with open(config_file, encoding="utf-8") as f:
            source = f.read()
        try:
            # safe_load: a recipe is data; YAML tags that construct objects are refused.
            config = MergeConfiguration.model_validate(yaml.safe_load(source))
        except (yaml.YAMLError, ValueError, RuntimeError) as exc:
            raise ProDistillError(
                f"{config_file} is not a valid mergekit recipe: {one_line(exc)}"
            ) from None
        if config.merge_method != "prodistill":
            raise ProDistillError(
                f"{config_file}: merge_method is '{config.merge_method}'; this command runs "
                "'prodistill' recipes (use mergekit-yaml for the others)"
            )
        run_prodistill(config, out_path, merge_options, source)
    except (ProDistillError, OSError) as exc:
        print(f"mergekit-prodistill: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
