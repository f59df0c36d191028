"""``mergekit-prodistill RECIPE OUT``: the same flags as ``mergekit-yaml``.

``mergekit-prodistill plan RECIPE`` prints what the merge will need (memory per device,
FLOPs, time) from the configs and the calibration files, without reading any weight.
"""

import sys

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_prodistill.errors import ProDistillError


def read_recipe(config_file: str):
    """The recipe's text and its configuration; only prodistill recipes are accepted."""
    with open(config_file, encoding="utf-8") as f:
        source = f.read()
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    if config.merge_method != "prodistill":
        raise ProDistillError(
            f"{config_file}: merge_method is '{config.merge_method}'; this command runs "
            "'prodistill' recipes (use mergekit-yaml for the others)"
        )
    return source, config


def fail(exc: Exception):
    print(f"mergekit-prodistill: error: {exc}", file=sys.stderr)
    sys.exit(2)


class MergeOrPlan(PrettyPrintHelp):
    """The merge command; ``plan`` as its first argument runs the plan command instead."""

    def main(self, args=None, prog_name=None, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        if args[:1] == ["plan"]:
            name = f"{prog_name or self.name} plan"
            return plan_command.main(args[1:], prog_name=name, **kwargs)
        return super().main(args, prog_name, **kwargs)

    def format_usage(self, ctx, formatter):
        super().format_usage(ctx, formatter)
        formatter.write(f"   or: {ctx.command_path} plan [OPTIONS] CONFIG_FILE   "
                        "(memory, FLOPs and time; reads no weights)\n")


@click.command("mergekit-prodistill", cls=MergeOrPlan)
@click.argument("config_file")
@click.argument("out_path")
@add_merge_options
def main(merge_options: MergeOptions, config_file: str, out_path: str):
    """Merge the experts of a prodistill recipe into its base model."""
    from mergekit_prodistill.distill import run_prodistill

    merge_options.apply_global_options()
    try:
        source, config = read_recipe(config_file)
        run_prodistill(config, out_path, merge_options, source)
    except (ProDistillError, OSError) as exc:
        fail(exc)


@click.command("plan", cls=PrettyPrintHelp)
@click.argument("config_file")
@add_merge_options
def plan_command(merge_options: MergeOptions, config_file: str):
    """Print the memory, FLOPs and time a prodistill recipe needs, reading no weights.

    Takes the merge's flags (--cuda, --device, --out-shard-size, ...), since they change
    the plan.
    """
    from mergekit_prodistill.config import parse_recipe
    from mergekit_prodistill.plan import make_plan

    merge_options.apply_global_options()
    try:
        _, config = read_recipe(config_file)
        print(make_plan(parse_recipe(config), merge_options).render())
    except (ProDistillError, OSError) as exc:
        fail(exc)


if __name__ == "__main__":
    main()
