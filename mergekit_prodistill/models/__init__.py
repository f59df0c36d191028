"""Models: reading model folders and checkpoints, each family's blocks and shapes, dtypes,
vocabularies. The lowest layer: it imports only the shared helpers at the package root."""
