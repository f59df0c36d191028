"""Start-up hook that lets an unmodified ``mergekit-yaml`` run ProDistill recipes.

mergekit has no plugin discovery, so the wheel installs ``mergekit_prodistill_startup.pth``,
which imports this module when Python starts. It must stay cheap and harmless: it imports
only the standard library and registers an import hook. Only once mergekit's own
``mergekit.merge`` or ``mergekit.scripts.run_yaml`` module has been imported does it call
:func:`mergekit_prodistill.integration.install`, which routes ``merge_method: prodistill``
to this package. Any failure here is swallowed (with a warning when it happens after
mergekit is imported): the hook can never break interpreter start-up or mergekit itself.
"""

import sys

_WATCHED = ("mergekit.merge", "mergekit.scripts.run_yaml")


class _InstallAfterExec:
    """Wraps mergekit's own loader and patches the module right after it executes."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        # Only now is mergekit's module complete; patching earlier would see no run_merge.
        try:
            from mergekit_prodistill import integration

            # integration itself imports mergekit.merge; mid-import there is nothing to do,
            # the importer (our own command) calls the block loop directly.
            if hasattr(integration, "install"):
                integration.install(module)
        except Exception as exc:  # never take mergekit down with us
            import warnings

            warnings.warn(f"mergekit-prodistill could not hook into mergekit: {exc!r}")


class _MergekitFinder:
    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _InstallAfterExec(spec.loader)
                return spec
        return None


def _register():
    if any(isinstance(f, _MergekitFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MergekitFinder())
    # Imported before the hook was in place (only possible outside start-up): patch now.
    for name in _WATCHED:
        module = sys.modules.get(name)
        if module is not None:
            from mergekit_prodistill import integration

            integration.install(module)


try:
    _register()
except Exception:  # pragma: no cover - start-up must never fail because of us
    pass
