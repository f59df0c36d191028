"""A merge's memory and FLOPs from shapes alone (:mod:`shapes`): the formulas, no policy.

The terms follow the block loop in ``distill.py`` phase by phase:

* ``load``: block l of the base, every task vector, and the expert block being read or the
  block merged at init; the two streams of every expert.
* ``train``: base + task vectors, the merged block and its gradient, lambda with its
  gradient and Adam's two moments (fp32), the two streams per expert, and the largest of a
  step's moments: the chain rule, the next merged block being built, one batch's
  forward/backward (:func:`training_step_bytes`).
* ``write``: base + task vectors, lambda, the trained block in fp32, the block as written
  (until its unit file is saved), then in the compute dtype to advance the merged stream.
* ``embed``: the embedding (or LM head) of every model, its task vectors and the merge.
* ``head`` (with ``head_epochs``): the final norm and LM head trained like a block.

Over several processes (expert-parallel, :mod:`parallel`) each counts the experts it owns
(every expert in ``embed``) and :func:`allreduce_bytes` gives what a step sends.

:func:`place` puts every term on the device that holds it, the activation cache where the
plan placed it, and adds the allocator's slack. ``docs/planning.md``
gives the formulas and the measured error.
"""

from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_prodistill.models.shapes import ModelShape, Workload, dtype_bytes

# Memory terms, in the order the table prints them.
WEIGHTS = "block weights"
LAMBDA = "lambda + grads + Adam"
CACHE = "activation cache"
CONTEXTS = "masks and positions"
TRANSIENT = "forward/backward, one batch"
OUTPUT = "output buffer, one shard"
EXPERT = "expert weights, generating"
GENERATION = "KV cache + activations"
SLACK = "allocator slack"
TERMS = (WEIGHTS, LAMBDA, CACHE, CONTEXTS, TRANSIENT, EXPERT, GENERATION, OUTPUT, SLACK)

# Allocators keep freed blocks for reuse, so a process holds more than its live tensors.
# CPU: glibc serves allocations under 32 MiB from its heap, which keeps freed blocks, and
# maps larger ones, returned at once; bench/plan_accuracy.py measured peak RSS 15% above
# the live bytes when every block tensor is small, and none above for 13B-sized tensors.
# CUDA: PyTorch's caching allocator; assumed, not measured.
SLACK_FRACTION = {"cpu": 0.15, "cuda": 0.10}

# Streams per expert alive at once: the merged and the expert stream. The teacher outputs
# and the advanced merged stream are written in place, batch by batch, into those two.
STREAMS = 2
# Held-out prompts (the fidelity report) keep three: merged, task arithmetic and expert.
HOLDOUT_STREAMS = 3


def saved_bytes(shape: ModelShape, rows: int, width: int, es: int) -> int:
    """Activations one batch's forward keeps for backward: measured on the family's own
    block (:mod:`~mergekit_prodistill.models.footprint`), per token and per (query, key)
    pair, and checked against autograd's saved tensors in tests/test_plan.py."""
    return shape.saved(rows, width, es)


def context_bytes(shape: ModelShape, work: Workload, es: int) -> int:
    """What ``BlockRunner.context`` keeps for every batch of every expert (its masks,
    positions and rotary tables), with the batch's attention mask: measured the same way."""
    context = shape.context(es)
    return sum(context.at(rows, width) for bs in work.batches for rows, width in bs)


def forward_backward_bytes(shape: ModelShape, rows: int, width: int, es: int) -> int:
    """Saved activations plus backward's working set: the gradients of two
    intermediate-size activations, and the loss's three fp32 copies of the output."""
    tokens = rows * width
    return saved_bytes(shape, rows, width, es) + tokens * (
        2 * es * shape.intermediate + 12 * shape.hidden)


def forward_bytes(shape: ModelShape, rows: int, width: int, es: int) -> int:
    """Working set of a forward without gradients: a few activations at a time."""
    return rows * width * (4 * shape.hidden + 3 * shape.intermediate) * es


def batch_flops(shape: ModelShape, rows: int, width: int) -> float:
    """Forward FLOPs of one batch through an average block: its matmuls plus the
    attention products (linear attention's state updates are not counted)."""
    return rows * width * (2 * shape.matmul_numel
                           + 4 * width * shape.heads * shape.head_dim * shape.quadratic_share)


def lambda_count(shape: ModelShape, experts: int, granularity: str) -> int:
    per_expert = {"element": shape.block_numel, "tensor": shape.block_tensors, "task": 1}
    return experts * per_expert[granularity]


def phase_bytes(shape, work, p, stored: List[str], dtypes: Dict[str, str], device_type: str,
                owned: Optional[Sequence[int]] = None, processes: int = 1):
    """Bytes of every memory term in every phase of one block (see the module doc) in
    the process that owns the experts ``owned`` (default: every one) of ``processes``,
    with ``work`` its batches (``Workload.only``, ``Workload.rows``); ``stored`` is every
    model's stored dtype (the base first), ``dtypes`` the merge's dtypes by role
    (``dtypes.decide``).

    It holds those experts' task vectors, coefficients and streams, and merges the
    embeddings of all (every process does); with several processes the fused step keeps
    an fp32 partial sum of its largest tensor for the all-reduce (optimizer.TrainingStep).
    """
    every = [dtype_bytes(d) for d in stored]  # bytes per element
    wb = every if owned is None else [every[0]] + [every[1 + i] for i in owned]
    tv_b, cb, cache_b, out_b = (dtype_bytes(dtypes[role])
                                for role in ("task_vectors", "compute", "cache", "output"))
    P, big, T = shape.block_numel, shape.largest, len(wb) - 1
    partial = 4 * big if processes > 1 and p.granularity == "element" else 0
    # Task vectors wider than the stored weights are formed from both promoted: the
    # expert's block and the base's, converted, beside the result.
    promoted = 2 * P * tv_b if tv_b > max(wb) else 0
    base, deltas = P * wb[0], T * P * tv_b
    lam = lambda_count(shape, T, p.granularity)
    widest = max((b for bs in work.batches for b in bs), key=lambda b: b[0] * b[1])
    cache = (STREAMS * sum(work.slots(i) for i in range(T))
             + HOLDOUT_STREAMS * work.holdout_slots()) * shape.stream_width * cache_b
    # The tensors that start the streams, each the merged and every expert's at once.
    embed = shape.input_numel
    forward = forward_bytes(shape, *widest, cb)
    written, unit = write_bytes(shape, cb, out_b, forward, device_type)
    phases = {
        "load": {
            # The last expert block being read, or the block merged at init for the loss
            # before training, whose sums of products (scalar coefficients keep the task
            # vectors' dtype) take up to three tensors at once.
            WEIGHTS: base + deltas + max(P * wb[-1] + promoted, P * cb),
            TRANSIENT: max(forward, (3 if T > 1 else 1) * big * max(tv_b, max(wb))),
        },
        "train": {
            WEIGHTS: base + deltas + 2 * P * cb,
            LAMBDA: 16 * lam,
            TRANSIENT: training_step_bytes(shape, widest, p.granularity, cb, lam) + partial,
        },
        "write": {
            WEIGHTS: base + deltas + 4 * P,
            LAMBDA: 4 * lam,
            TRANSIENT: written,
            OUTPUT: unit,
        },
        "embed": {
            WEIGHTS: embed * (2 * every[0] + sum(w + max(every[0], w) for w in every[1:])),
            # merge() sums the products lambda_i tau_i: two more matrices at once.
            TRANSIENT: embed * max(every) * min(2, len(every) - 1),
        },
        "head": head_bytes(shape, widest, p, wb, tv_b, cb, every, processes),
    }
    return {name: terms | {CACHE: cache} for name, terms in phases.items()}  # the streams


def write_bytes(shape: ModelShape, cb: int, out_b: int, forward: int, device_type: str):
    """(transient, unit) while writing a block: the trained block is summed in fp32 tensor
    by tensor (8 bytes per element beside each result: CPU kernels copy an input of another
    dtype to promote it); the block as written (its unit) is held until its file is saved;
    then the block in the compute dtype advances the merged stream."""
    unit = shape.block_numel * out_b
    written = max(8 * shape.largest, shape.block_numel * cb + forward)
    if device_type == "cpu":  # the unit is freed before the block is cast
        written = max(written, unit) - unit
    return written, unit


def training_step_bytes(shape: ModelShape, widest: Tuple[int, int], granularity: str,
                        cb: int, lam: int) -> int:
    """A training step's largest moment (distill.py, coefficients.py) beyond the block
    weights with the merged block and its gradient, and 16 bytes per coefficient (lambda,
    its gradient, Adam's two moments). One of:

    * the chain rule, tensor by tensor: the merged gradient in fp32 and the task vector
      promoted to fp32 (CPU kernels copy an input of another dtype), 8 bytes per element
      of the largest tensor, plus their product when the coefficient is a scalar (summed);
    * the next step's merged block, built beside the last one and its gradient once the
      coefficients' gradients are freed (4 bytes per coefficient less): the block in the
      compute dtype plus one tensor's fp32 sum and promoted task vector;
    * one batch's forward and backward (gradients freed too), and the gradient of one
      weight tensor being added to the merged block's.

    Fused Adam updates in place. Its first step's gradient statistics (9 bytes per
    element of one tensor) come before its moments exist: never the largest moment.
    """
    P, big = shape.block_numel, shape.largest
    return max((8 if granularity == "element" else 12) * big,
               P * cb + 8 * big - 4 * lam,
               forward_backward_bytes(shape, *widest, cb) + cb * big - 4 * lam)


def head_bytes(shape: ModelShape, widest: Tuple[int, int], p, wb: List[int], tv_b: int,
               cb: int, every: List[int], processes: int = 1):
    """Training the final norm and LM head (head.py): the base head and the owned experts'
    task vectors (``every`` expert's while they are read), the merged head and a teacher's
    head in the compute dtype, lambda with its gradient and Adam state (the head's, when
    it is its own tensor), and per step the larger of one batch's fp32 logits (student
    and teacher log-probabilities and the KL's three temporaries) and 12 bytes per head
    element: the fp32 sums that build the merged head (up to three at once), or a
    backward beside every gradient: the merged head's gradient, its fp32 copy and its
    product with a task vector; over several processes, the fused step's fp32 partial sum
    of its largest trained tensor."""
    vh, T = shape.hidden * shape.vocab[0], len(wb) - 1
    trained = vh if not shape.tied else 0
    partial = 4 * (trained or shape.hidden) if processes > 1 and p.granularity == "element" \
        else 0
    rows, width = widest
    return {
        WEIGHTS: vh * (wb[0] + max(sum(max(tv_b, w) for w in every[1:]),
                                   tv_b * (len(wb) - 1) + 2 * cb)),
        LAMBDA: 16 * T * (trained + shape.hidden),
        TRANSIENT: max(5 * 4 * rows * width * shape.vocab[0], 3 * 4 * vh) + partial,
    }


def step_traffic(shape: ModelShape, wb: List[int], cb: int, lam: int,
                 device_type: str = "cpu") -> float:
    """Bytes read and written by one step's element-wise work (not the matmuls).

    Per weight element: back-propagating every expert's batch into the merged block's
    gradient, then, with element-wise lambda, one pass (optimizer.TrainingStep) that reads
    that gradient, the base and every task vector, reads and writes each coefficient's
    value and Adam moments (24 bytes) and writes the next merged weight: chunk by chunk
    through the CPU's cache, or, on CUDA, one compiled kernel whose fp32 sum is written
    and read back once more (8 bytes). Scalar lambda (tensor- or task-wise) takes separate
    passes: the chain rule grad * tau_i in fp32 (about 12 + weight bytes per expert) and
    the next merged block built in fp32 and cast (about 12 bytes per expert + the reads).
    """
    P, T = shape.block_numel, len(wb) - 1
    backward = 2 * T * P * cb
    if lam >= P:
        fused = P * (wb[0] + 2 * cb) + sum(P * max(wb[0], w) for w in wb[1:])
        return backward + fused + 24 * lam + (8 * P if device_type == "cuda" else 0)
    merge = P * (wb[0] + 8 + cb) + sum(P * (max(wb[0], w) + 12) for w in wb[1:])
    chain = sum(P * (cb + 12 + max(wb[0], w)) for w in wb[1:])
    return merge + backward + chain + 76 * lam


def allreduce_bytes(processes: int, numel: int, element_bytes: int) -> float:
    """Bytes each process sends in a ring all-reduce of ``numel`` elements (gloo's and
    NCCL's algorithm for large tensors): 2 (R - 1) / R of the tensor."""
    return 2 * (processes - 1) / processes * numel * element_bytes


def output_buffer(shape: ModelShape, out_b: int, shard_size: int) -> int:
    """The writer holds tensors until a shard is full: at most one shard (or tensor)."""
    embed = shape.hidden * shape.vocab[0]
    total = out_b * (shape.num_layers * shape.block_numel + shape.input_numel
                     + (0 if shape.tied else embed))
    largest = out_b * max(shape.input_numel, shape.largest)
    return min(total, max(largest, shard_size) if shard_size > 0 else total)


def slack(device: str, terms: Dict[str, int], heap_share: float) -> int:
    kind = device.split(":")[0]
    fraction = SLACK_FRACTION.get(kind, 0.0) * (heap_share if kind == "cpu" else 1.0)
    return int(fraction * sum(terms.values()))


def place(per_phase, contexts: int, dev: str, cache_at: Optional[str], heap_share: float):
    """device -> phase -> term -> bytes, with the cache on ``cache_at`` (None: disk).

    Weights, lambda, activations of the running batch, masks and positions live on the
    compute device; the output buffer and a cache that leaves the device on the CPU.
    Assembling the output comes after the merge: nothing else is held then.
    """
    phases = {dev: {}, "cpu": {}}
    for name, terms in per_phase.items():
        phases[dev][name] = {k: v for k, v in terms.items() if k not in (CACHE, OUTPUT)}
        if name != "assemble":
            phases[dev][name][CONTEXTS] = contexts
        phases["cpu"].setdefault(name, {})[OUTPUT] = terms.get(OUTPUT, 0)
        if cache_at is not None and CACHE in terms:
            phases[cache_at][name][CACHE] = terms[CACHE]
    for device, by_phase in phases.items():
        for terms in by_phase.values():
            terms[SLACK] = slack(device, terms, heap_share)
    return phases


def peak_total(phases, device: str) -> int:
    return max(sum(terms.values()) for terms in phases[device].values())

