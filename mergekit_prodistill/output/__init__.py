"""Output: the staging folder, saved progress, the report, the model card and the Hub.
Imports ``plan``, ``inputs``, ``models`` and the shared helpers; never ``training``."""
