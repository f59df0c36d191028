"""Durable progress, so that running the same command again continues a merge.

Each expert's continued calibration prompts (``continue_tokens``) are saved first, so a
run that continues never generates them again. After every finished unit (the embeddings,
each decoder block, the head) its merged tensors are saved to their own file under the
staging folder; after every block the activation streams, the random generator and the
report so far are saved too. Files are written to a temporary name and renamed, so a kill
at any moment leaves the last finished state intact. Over several processes each saves
its own streams, and rank 0 the units, the continuations and the state, which names the
streams to continue from only once every process has saved them. A fingerprint of the
recipe, the options that change results, the input files and the prompts guards against
continuing a different merge. At the end the shards are assembled from the unit files
with mergekit's ``TensorWriter``.
"""

import hashlib
import json
import os
import shutil
from typing import Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.layout import CONTINUATIONS, PROGRESS, STATE, streams_file, unit_file
from mergekit_prodistill.parallel import SINGLE, World


def _file_identity(path: str) -> str:
    """Cheap identity of an input file: its size and a hash of its head.

    For safetensors the head is the header (names, dtypes, shapes, offsets); weights
    themselves are not hashed, as reading a 13B model twice would cost minutes.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return f"{os.path.getsize(path)}:{digest.hexdigest()}"


def fingerprint(recipe_text: str, settings: Dict, model_files: List[str],
                calibration_batches) -> str:
    """What makes two runs the same merge: recipe, settings, models, calibration tokens.

    Hashing the prompts' token ids covers every calibration source (files, folders,
    datasets) together with its template, tokenizer, sampling and truncation. They are the
    ids before any continuation: continuations are an output of the merge, saved with it.
    """
    digest = hashlib.sha256(recipe_text.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for batches in calibration_batches:
        for batch in batches:
            digest.update(batch.input_ids.numpy().tobytes())
    for path in sorted(model_files):
        digest.update(f"{os.path.abspath(path)}={_file_identity(path)}".encode())
    return digest.hexdigest()


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Progress:
    def __init__(self, staging: str, fingerprint: str, world: World = SINGLE):
        self.dir = os.path.join(staging, PROGRESS)
        self.fingerprint = fingerprint
        self.world = world
        self.state_path = os.path.join(self.dir, STATE)
        self.continuations_path = os.path.join(self.dir, CONTINUATIONS)

    def has_progress(self) -> bool:
        return os.path.exists(self.state_path)

    def has_continuations(self) -> bool:
        return os.path.exists(self.continuations_path)

    def restore_or_reset(self) -> Optional[dict]:
        """The saved loop state of an interrupted run of this same merge, if there is one.

        A folder holding only the continuations of this merge is kept (the loop starts
        from the first block); one holding another merge's progress is refused. Rank 0
        decides, for every process.
        """
        state = self.world.from_leader(self._restore_or_reset)
        os.makedirs(self.dir, exist_ok=True)  # on nodes that do not share rank 0's disk
        return state

    def _restore_or_reset(self) -> Optional[dict]:
        saved = {path: _read_json(path) for path in (self.state_path, self.continuations_path)}
        if not any(saved.values()):
            shutil.rmtree(self.dir, ignore_errors=True)
            os.makedirs(self.dir)
            return None
        if any(s["fingerprint"] != self.fingerprint for s in saved.values() if s):
            raise ProDistillError(
                f"{os.path.dirname(self.dir)} holds an unfinished merge of a different recipe "
                "or different input files; delete that folder to start this merge afresh"
            )
        return saved[self.state_path]

    # -- continued calibration prompts, before the first block -----------------------------
    def save_continuations(self, sequences: List[List[List[int]]]) -> None:
        if self.world.leader:
            data = {"fingerprint": self.fingerprint, "sequences": sequences}
            _atomic(self.continuations_path, lambda p: _write_json(p, data))

    def load_continuations(self) -> Optional[List[List[List[int]]]]:
        """Every expert's continued token ids, as saved by this merge (None: not yet)."""
        def load():
            saved = _read_json(self.continuations_path)
            return saved["sequences"] if saved else None
        return self.world.from_leader(load)

    # -- merged tensors, one file per unit ------------------------------------------------
    def unit_path(self, unit: str) -> str:
        return os.path.join(self.dir, unit_file(unit))

    def save_unit(self, unit: str, tensors: Dict[str, torch.Tensor]) -> None:
        _atomic(self.unit_path(unit), lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def assemble(self, units: List[str], writer) -> None:
        """Feed every unit's tensors, in order, to the output shard writer."""
        for unit in units:
            with safe_open(self.unit_path(unit), framework="pt") as f:
                for name in f.keys():
                    writer.save_tensor(name, f.get_tensor(name))

    # -- streams and loop state, after every block ----------------------------------------
    def _streams_path(self, blocks_done: int) -> str:
        return os.path.join(self.dir, streams_file(blocks_done, self.world.rank,
                                                   self.world.size))

    def save_state(self, blocks_done: int, streams, generator: torch.Generator,
                   report_blocks: List[dict]) -> None:
        """Save this process's streams after ``blocks_done`` blocks; once every process
        has, rank 0 moves the state forward and the older streams go."""
        flat = {
            f"{s}.{i}.{b}": t.cpu().contiguous()
            for s, stream in enumerate(streams)
            for i, batches in enumerate(stream)
            for b, t in enumerate(batches)
        }
        flat["generator"] = generator.get_state()
        _atomic(self._streams_path(blocks_done), lambda p: save_file(
            flat, p, metadata={"fingerprint": self.fingerprint}))
        self.world.barrier()
        if self.world.leader:
            state = {"fingerprint": self.fingerprint, "blocks_done": blocks_done,
                     "report_blocks": report_blocks}
            _atomic(self.state_path, lambda p: _write_json(p, state))
        self.world.barrier()
        if blocks_done > 0 and os.path.exists(self._streams_path(blocks_done - 1)):
            os.remove(self._streams_path(blocks_done - 1))

    def load_streams(self, blocks_done: int, streams, generator: torch.Generator) -> None:
        """Copy the streams saved after ``blocks_done`` blocks into ``streams`` (allocated
        alike) and restore the RNG."""
        path = self._streams_path(blocks_done)
        if not os.path.exists(path):
            raise ProDistillError(f"{path} is missing: this process cannot continue the "
                                  "merge; delete the folder to start it afresh")
        with safe_open(path, framework="pt") as saved:
            if (saved.metadata() or {}).get("fingerprint") != self.fingerprint:
                raise ProDistillError(f"{path} belongs to another merge; delete the folder "
                                      "to start this merge afresh")
            for s, stream in enumerate(streams):
                for i, batches in enumerate(stream):
                    for b, t in enumerate(batches):
                        t.copy_(saved.get_tensor(f"{s}.{i}.{b}"))
            generator.set_state(saved.get_tensor("generator"))



class UnitWriter:
    """Takes the merged tensors unit by unit: the embeddings, each block, the head.

    Without a checkpoint they go straight to the shard writer (streaming task arithmetic).
    With one, each finished unit is saved on its own, and the shards are assembled from
    those files at the end.
    """

    def __init__(self, writer, checkpoint: Optional[Progress]):
        self.writer = writer
        self.checkpoint = checkpoint
        self.pending: Dict[str, torch.Tensor] = {}

    def save_tensor(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.cpu().contiguous()
        if self.checkpoint is None:
            self.writer.save_tensor(name, tensor)
        else:
            self.pending[name] = tensor

    def end_unit(self, unit: str) -> None:
        if self.checkpoint is not None:
            self.checkpoint.save_unit(unit, self.pending)
            self.pending = {}

    def finalize(self, units: List[str]) -> None:
        if self.checkpoint is not None:
            self.checkpoint.assemble(units, self.writer)
        self.writer.finalize()
