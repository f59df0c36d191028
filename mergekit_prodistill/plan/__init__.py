"""Plan: what a merge needs (memory, FLOPs, time, devices) and whether it fits, decided
before any weight is read. Imports ``inputs``, ``models`` and the shared helpers."""
