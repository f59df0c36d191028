"""How ``mergekit-yaml`` reaches ProDistill: routing recipes and registering the method.

mergekit 0.1.x plans one task per tensor, which cannot express ProDistill's sequential
block training, and ``mergekit-yaml`` has no plugin discovery. So:

* :func:`install` (called by the start-up hook in ``_startup.py`` right after mergekit
  imports ``mergekit.merge`` or ``mergekit.scripts.run_yaml``) wraps ``run_merge`` so a
  recipe with ``merge_method: prodistill`` goes to :func:`mergekit_prodistill.run.run_prodistill`
  and every other recipe goes to mergekit untouched. It also registers a ``prodistill``
  entry in mergekit's method registry, so lookups by name (model card links, tooling)
  work; that entry refuses to run through mergekit's per-tensor planner.

The private helpers of ``mergekit.merge`` that the output reuses are re-exported by
:mod:`mergekit_prodistill.output.mergekit_internals`.
"""

import functools
import sys

import mergekit.merge as _mk_merge
import torch

METHOD_NAME = "prodistill"
_PATCHED = "__prodistill_wrapped__"


def _route(run_merge, exit_on_error: bool):
    """Wrap mergekit's ``run_merge`` so prodistill recipes reach our block loop."""
    if getattr(run_merge, _PATCHED, False):
        return run_merge

    @functools.wraps(run_merge)
    def routed(merge_config, out_path, options, config_source=None, **kwargs):
        if merge_config.merge_method != METHOD_NAME:
            return run_merge(merge_config, out_path, options, config_source, **kwargs)
        from mergekit_prodistill.errors import ProDistillError, exit_with
        from mergekit_prodistill.run import run_prodistill

        try:
            return run_prodistill(merge_config, out_path, options, config_source)
        except ProDistillError as exc:
            if not exit_on_error:
                raise
            exit_with(exc)  # the command line gets one clear line, not a traceback

    setattr(routed, _PATCHED, True)
    return routed


class _ValidatedOrOneLine:
    """``mergekit-yaml``'s ``MergeConfiguration``: validates as mergekit does, but a
    prodistill recipe that mergekit refuses (``models: []``, say) ends in one line on
    stderr, as under ``mergekit-prodistill``, instead of mergekit's traceback."""

    @staticmethod
    def model_validate(data, *args, **kwargs):
        from mergekit.config import MergeConfiguration

        try:
            return MergeConfiguration.model_validate(data, *args, **kwargs)
        except (ValueError, RuntimeError) as exc:
            if not (isinstance(data, dict) and data.get("merge_method") == METHOD_NAME):
                raise
            from mergekit_prodistill.errors import ProDistillError, exit_with, one_line

            exit_with(ProDistillError(
                f"the recipe is not a valid mergekit recipe: {one_line(exc)}"))


def _register_method():
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.easy_define import merge_method

    if any(m.spec.name == METHOD_NAME for m in registry.registered_methods()):
        return

    def prodistill(group: TensorGroup) -> torch.Tensor:
        raise RuntimeError(
            "ProDistill trains whole decoder blocks and cannot run through mergekit's "
            "per-tensor planner; run the recipe with mergekit-yaml or mergekit-prodistill "
            "with mergekit-prodistill installed."
        )

    registry.register(
        merge_method(
            prodistill,
            name=METHOD_NAME,
            pretty_name="ProDistill",
            reference_url="https://arxiv.org/abs/2502.12706",
        )
    )


def install(module=None):
    """Route prodistill recipes in ``module`` (or in every loaded mergekit entry point)."""
    _mk_merge.run_merge = _route(_mk_merge.run_merge, exit_on_error=False)
    _register_method()
    run_yaml = sys.modules.get("mergekit.scripts.run_yaml")
    if run_yaml is not None and hasattr(run_yaml, "run_merge"):
        # Bound by name at import time; the command line exits cleanly on a user error.
        inner = getattr(run_yaml.run_merge, "__wrapped__", run_yaml.run_merge)
        if not getattr(run_yaml, _PATCHED, False):
            run_yaml.run_merge = _route(inner, exit_on_error=True)
            run_yaml.MergeConfiguration = _ValidatedOrOneLine  # read by name in main()
            setattr(run_yaml, _PATCHED, True)
