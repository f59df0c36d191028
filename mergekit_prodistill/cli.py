"""``mergekit-prodistill RECIPE OUT``: the same flags as ``mergekit-yaml``, plus publishing.

``--push-to-hub REPO_ID`` (with ``--private`` and ``--revision``) uploads the finished
merge; mergekit-yaml's own flags belong to mergekit and cannot grow, so publishing lives
on this command only. ``mergekit-prodistill plan RECIPE`` prints what the merge will need
(memory per device, FLOPs, time; per process with torchrun's ``--nproc-per-node`` and
``--nnodes``) from the configs and the calibration files, without reading any weight.
"""

import sys

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions, PrettyPrintHelp, ShardSizeParamType, add_merge_options

from mergekit_prodistill.errors import ProDistillError, exit_with, one_line


def read_recipe(config_file: str):
    """The recipe's text and its configuration; only prodistill recipes are accepted."""
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
    return source, config


class MergeOrPlan(PrettyPrintHelp):
    """The merge command; ``plan`` as its first argument runs the plan command instead."""

    def main(self, args=None, prog_name=None, **kwargs):
        args = list(sys.argv[1:] if args is None else args)
        try:
            if args[:1] == ["plan"]:
                name = f"{prog_name or self.name} plan"
                return plan_command.main(args[1:], prog_name=name, **kwargs)
            return super().main(args, prog_name, **kwargs)
        except ProDistillError as exc:  # a flag's value, refused while click reads it
            exit_with(exc)

    def format_usage(self, ctx, formatter):
        super().format_usage(ctx, formatter)
        formatter.write(f"   or: {ctx.command_path} plan [OPTIONS] CONFIG_FILE   "
                        "(memory, FLOPs and time; reads no weights)\n")


@click.command("mergekit-prodistill", cls=MergeOrPlan)
@click.argument("config_file")
@click.argument("out_path")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None,
              help="Upload the finished merge to this Hugging Face model repo (created if "
              "missing). Token: HF_TOKEN or `hf auth login`.")
@click.option("--private", is_flag=True, default=False,
              help="With --push-to-hub: create the repo private.")
@click.option("--revision", metavar="BRANCH", default=None,
              help="With --push-to-hub: the branch to upload to (created if missing).")
@add_merge_options
def main(merge_options: MergeOptions, config_file: str, out_path: str,
         push_to_hub: str, private: bool, revision: str):
    """Merge the experts of a prodistill recipe into its base model."""
    from mergekit_prodistill import integration
    from mergekit_prodistill.output import hub
    from mergekit_prodistill.run import run_prodistill

    integration.install()  # as under mergekit-yaml: the method is known by name (card link)
    try:
        _apply_flags(merge_options)
        if (private or revision) and not push_to_hub:
            raise ProDistillError("--private and --revision apply to --push-to-hub REPO_ID")
        if push_to_hub:
            hub.check_ready(push_to_hub)
        source, config = read_recipe(config_file)
        run_prodistill(config, out_path, merge_options, source)
        if push_to_hub:
            url = hub.push(out_path, push_to_hub, private=private, revision=revision)
            print(f"uploaded {out_path} to {url}", file=sys.stderr)
    except (ProDistillError, OSError) as exc:
        exit_with(exc)


@click.command("plan", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.option("--nproc-per-node", "nproc_per_node", type=click.IntRange(min=1), default=1,
              show_default=True, help="Processes per machine, as given to torchrun.")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Machines, as given to torchrun.")
@add_merge_options
def plan_command(merge_options: MergeOptions, config_file: str, nproc_per_node: int,
                 nnodes: int):
    """Print the memory, FLOPs and time a prodistill recipe needs, reading no weights.

    Takes the merge's flags (--cuda, --device, --out-shard-size, ...), since they change
    the plan, and torchrun's --nproc-per-node and --nnodes: over several processes it
    plans process 0, which owns the most experts.
    """
    from mergekit_prodistill.models import erasure
    from mergekit_prodistill.parallel import World
    from mergekit_prodistill.plan.planner import make_plan
    from mergekit_prodistill.recipe import parse_recipe

    world = World(rank=0, size=nproc_per_node * nnodes, local_size=nproc_per_node)
    try:
        _apply_flags(merge_options)
        _, config = read_recipe(config_file)
        recipe = parse_recipe(config)
        planned = make_plan(recipe, merge_options, world=world)
        erasure.warn_if_erased(recipe, planned.dtypes["output"])
        print(planned.render())
    except (ProDistillError, OSError) as exc:
        exit_with(exc)


def _apply_flags(merge_options: MergeOptions) -> None:
    """mergekit's global flags (seed, threads, logging), once their values are checked:
    mergekit's own set-up ends in a traceback on a seed or thread count it cannot use."""
    from mergekit_prodistill.preflight import check_flags

    check_flags(merge_options)
    merge_options.apply_global_options()


class _ShardSize(ShardSizeParamType):
    """mergekit's ``--out-shard-size`` type, with one line for a value that is no size."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except (ValueError, IndexError):
            raise ProDistillError(
                f"--out-shard-size {value}: not a size; give a whole number of parameters "
                "per shard, with K, M or B for thousands, millions or billions (e.g. 5B)"
            ) from None


for _param in (*main.params, *plan_command.params):
    if _param.name == "out_shard_size":
        _param.type = _ShardSize()


if __name__ == "__main__":
    main()
