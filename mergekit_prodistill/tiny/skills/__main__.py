"""``python -m mergekit_prodistill.tiny.skills build|table OUT``: the quick start's steps."""

from .quickstart import main

main()
