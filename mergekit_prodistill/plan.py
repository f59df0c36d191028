"""Predict a merge's memory, FLOPs and time before any weight is read.

The plan reads only each model's ``config.json`` (plus the dtype in the safetensors header
of a local checkpoint) and the calibration files, tokenised with the model's own tokenizer
when one is at hand, else estimated from their length. It follows the block loop in
``distill.py`` phase by phase:

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
* ``continuation`` (with ``continue_tokens``, when training): one expert placed for
  generation by ``continuation.place_expert`` from the memory free now (whole on the
  device when it fits, else partly offloaded), and the KV cache and activations of one
  batch of its prompts. Its time is the generation's FLOPs, the expert's weights read at
  every generated token, and the offloaded part brought in from CPU memory or disk.
* ``assemble`` (when training): the output shards built from the saved unit files.

Every phase also holds the masks and positions of all batches. A merge without training
streams its output: the writer holds up to one shard (it flushes a shard once full) in
every phase. Each device's peak is its largest phase. The Python runtime itself (torch
and libraries, about 0.5 GB on CPU) is not included: it is already in use when the check
runs. ``README.md`` ("Planning and memory") gives the
formulas and the measured error.
"""

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from mergekit.common import dtype_from_name

from mergekit_prodistill import calibration, continuation, dtypes
from mergekit_prodistill.blocks import check_supported
from mergekit_prodistill.errors import ProDistillError

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
HEAP_LIMIT = 32 * 2**20

# Streams per expert alive at once: z1 and z2. The teacher outputs and the advanced merged
# stream are written in place, batch by batch, into those two buffers.
STREAMS = {"load": 2, "train": 2, "write": 2, "embed": 2, "head": 2}
PHASES = {"load": "reading a block", "train": "training a block",
          "write": "writing a block", "embed": "merging the embeddings",
          "head": "training the final norm and LM head",
          "continuation": "continuing the prompts",
          "assemble": "assembling the output shards"}
# Without a tokenizer, count one token per this many characters: a deliberately high
# count for English prose and code under Llama-style tokenizers (they average 3.5-4.5).
CHARS_PER_TOKEN = 3.0
GB = 1e9


@dataclass(frozen=True)
class DeviceClass:
    """Achievable (not peak) rates of a device class, for the time estimate."""

    name: str
    kind: str  # the torch device type
    tflops: Dict[str, float]  # dense matmul TFLOP/s reached in practice, per dtype
    memory_gbps: float  # element-wise memory bandwidth, GB/s
    memory_gb: float  # device memory, GB
    disk_gbps: float  # checkpoint read/write rate, GB/s
    basis: str
    link_gbps: float = 20.0  # CPU memory to device (PCIe), GB/s


def gpu(name: str, bf16: float, fp32: float, memory_gbps: float, memory_gb: float,
        link_gbps: float, basis: str) -> DeviceClass:
    return DeviceClass(name, "cuda", {"float32": fp32, "bfloat16": bf16, "float16": bf16},
                       memory_gbps, memory_gb, 2.0, basis, link_gbps)


DEVICE_CLASSES = (
    DeviceClass(
        "cpu-2core", "cpu", {"float32": 0.18, "bfloat16": 0.77, "float16": 0.10}, 5, 24, 1.0,
        "2-core x86: idle 2048^3 matmul rates; Adam's element-wise rate (2.6 GB/s measured "
        "under load, 5 assumed idle)",
    ),
    gpu("a100-80gb", 140, 14, 1500, 80, 20,
        "45% of peak bf16 (312), fp32 without TF32 at 70% of 19.5, 75% of 2.0 TB/s"),
    gpu("h100-80gb", 445, 47, 2500, 80, 40,
        "SXM: 45% of peak bf16 (989), fp32 without TF32 at 70% of 67, 75% of 3.35 TB/s"),
    gpu("h200-141gb", 445, 47, 3600, 141, 40, "as the H100 with 75% of 4.8 TB/s"),
)


def dtype_bytes(name: str) -> int:
    return torch.empty((), dtype=dtype_from_name(name)).element_size()


@dataclass(frozen=True)
class ModelShape:
    """One decoder block and the tensors around it, from config.json alone."""

    num_layers: int
    hidden: int
    heads: int
    head_dim: int
    intermediate: int
    block_numel: int  # parameters of one block
    block_tensors: int
    largest: int  # elements of the block's largest tensor
    matmul_numel: int  # elements of the block's matrices: 2 FLOPs each per token
    vocab: Tuple[int, ...]  # embedding rows of the base, then of each expert
    tied: bool
    attention_types: int  # kinds of attention mask (full, sliding)
    head_norm_values: int  # per token, values through q/k norms (Qwen3); 0 without them
    heap_share: float  # share of the block's parameters in tensors under HEAP_LIMIT in fp32
    norms: int = 2  # hidden-size norms per block (Gemma2 and Gemma3: 4)
    fp32_norms: bool = False  # norms keep their output in fp32 (Gemma's 1 + weight)
    eager_attention: bool = False  # attention in plain torch ops (soft-capping), not sdpa
    softcap: bool = False  # attention scores soft-capped (tanh)
    rotary_tables: int = 1  # rotary (cos, sin) tables per batch (Gemma3: one per kind)


@dataclass(frozen=True)
class Workload:
    """Calibration batches of every expert as (prompts, padded width)."""

    batches: Tuple[Tuple[Tuple[int, int], ...], ...]
    tokens: Tuple[int, ...]  # real tokens per expert
    source: str
    prompt_lengths: Tuple[Tuple[int, ...], ...]  # per expert, before any continuation

    def slots(self, expert: int) -> int:
        """Token positions of one expert's stream, padding included."""
        return sum(rows * width for rows, width in self.batches[expert])


@dataclass
class Plan:
    """What a merge will need: bytes per device and phase, FLOPs and bytes moved."""

    recipe: object
    shape: ModelShape
    work: Workload
    dtypes: Dict[str, str]  # weights, compute, cache, output
    device: str
    cache_at: str  # device name, "cpu" or "disk"
    phases: Dict[str, Dict[str, Dict[str, int]]]  # device -> phase -> term -> bytes
    flops: Dict[str, float]
    moved_bytes: float  # element-wise traffic of all training steps
    io_bytes: float  # checkpoints read and output written
    cache_bytes: int  # the activation cache at its largest, wherever it is
    available: Dict[str, Optional[int]] = field(default_factory=dict)
    generation: List[continuation.Placement] = field(default_factory=list)  # per expert
    continuation_reads: Dict[str, float] = field(default_factory=dict)  # bytes, by source

    def peak(self, device: str) -> Tuple[str, Dict[str, int]]:
        """The phase with the most bytes on ``device`` and its terms."""
        name = max(self.phases[device], key=lambda ph: sum(self.phases[device][ph].values()))
        return name, self.phases[device][name]

    def total(self, device: str) -> int:
        return peak_total(self.phases, device)

    def seconds(self, cls: DeviceClass) -> float:
        rate = cls.tflops.get(self.dtypes["compute"], cls.tflops["float32"]) * 1e12
        return (
            (self.flops["training"] + self.flops["forwards"]) / rate
            + self.moved_bytes / (cls.memory_gbps * GB)
            + self.io_bytes / (cls.disk_gbps * GB)
            + self.continuation_seconds(cls)
        )

    def continuation_seconds(self, cls: DeviceClass) -> float:
        """Generating every expert's continuations: loading it, its FLOPs, and its weights
        read at every forward pass from where they are."""
        if not self.generation:
            return 0.0
        rate = cls.tflops.get(self.dtypes["compute"], cls.tflops["float32"]) * 1e12
        reads = self.continuation_reads
        return (
            self.flops["continuation"] / rate
            + reads["device"] / (cls.memory_gbps * GB)
            + reads["host"] / (cls.link_gbps * GB)
            + (reads["load"] + reads["disk"]) / (cls.disk_gbps * GB)
        )

    def render(self) -> str:
        s, p = self.shape, self.recipe.params
        lines = [
            f"ProDistill plan: {len(self.recipe.experts)} experts onto {self.recipe.base}",
            f"  {s.num_layers} blocks of {s.block_numel / 1e6:.1f}M parameters (hidden "
            f"{s.hidden}, intermediate {s.intermediate}, {s.heads} heads); vocabulary "
            + "/".join(str(v) for v in sorted(set(s.vocab))),
            f"  calibration ({self.work.source}): "
            + ", ".join(f"{n} prompts/{t} tokens" for n, t in zip(
                (sum(r for r, _ in b) for b in self.work.batches), self.work.tokens))
            + f"; batch_size {p.batch_size}, max_length {p.max_length}",
            f"  dtypes: weights {self.dtypes['weights']}, compute {self.dtypes['compute']}, "
            f"lambda float32 ({p.granularity}), cache {self.dtypes['cache']} on "
            f"{self.cache_at}, output {self.dtypes['output']}",
        ]
        if self.generation:
            known = self.available.get(self.device) is not None
            lines.append(
                f"  continuation: up to {p.continue_tokens} tokens per prompt; each expert "
                + "; ".join(sorted({c.describe() for c in self.generation}))
                + ("" if known else f" (free memory on {self.device} unknown: as if enough)"))
        if len(set(s.vocab)) > 1:
            lines.append(
                "  note: vocabulary sizes differ between the models; embeddings and LM head "
                "must have the same shape in every model to be merged"
            )
        devices = list(self.phases)
        peaks = {d: self.peak(d) for d in devices}
        width = max(len(t) for t in TERMS) + 2
        lines += ["", "memory at each device's peak".ljust(width)
                  + "".join(f"{d:>14}" for d in devices)]
        lines.append("  (phase)".ljust(width) + "".join(f"{peaks[d][0]:>14}" for d in devices))
        for term in TERMS:
            lines.append(f"  {term}".ljust(width)
                         + "".join(f"{cell(peaks[d][1].get(term, 0)):>14}" for d in devices))
        lines.append("  total".ljust(width)
                     + "".join(f"{fmt_bytes(self.total(d)):>14}" for d in devices))
        if self.cache_at == "disk":
            lines.append(f"  {CACHE} on disk: {fmt_bytes(self.cache_bytes)}")
        lines.append("  available now".ljust(width) + "".join(
            f"{cell(self.available[d]) if self.available.get(d) else 'unknown':>14}"
            for d in devices))
        f = self.flops
        lines += [
            "",
            f"compute: training {f['training']:.3g} FLOPs (forward + backward, "
            f"{f['steps']} steps x {f['epochs']} epochs x {s.num_layers} blocks), forwards "
            f"{f['forwards']:.3g} FLOPs (teacher outputs, losses, stream updates), "
            f"continuation {f['continuation']:.3g} FLOPs, "
            f"element-wise traffic {fmt_bytes(self.moved_bytes)}, checkpoint I/O "
            f"{fmt_bytes(self.io_bytes)}"
            + "".join(f", continuation reads {fmt_bytes(self.continuation_reads[k])} from {k}"
                      for k in ("host", "disk") if self.continuation_reads.get(k)),
            "",
            "time estimate (achievable rates, see README)",
        ]
        for cls in DEVICE_CLASSES:
            fits = ""
            if cls.kind == torch.device(self.device).type:
                fits = "fits" if self.total(self.device) <= cls.memory_gb * GB else "too big"
                fits = f"{fits} in {cls.memory_gb:.0f} GB; "
            if self.generation:
                fits += f"continuation {fmt_seconds(self.continuation_seconds(cls))}; "
            lines.append(f"  {cls.name:<12} {fmt_seconds(self.seconds(cls)):>10}   "
                         f"{fits}{cls.basis}")
        return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def cell(n: float) -> str:
    return fmt_bytes(n) if n else "-"


def fmt_seconds(t: float) -> str:
    if t >= 3600:
        return f"{t / 3600:.1f} h"
    return f"{t / 60:.1f} min" if t >= 60 else f"{t:.1f} s"


# --------------------------------------------------------------------------- reading


def load_config(model, trust_remote_code: bool):
    try:
        return model.config(trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ProDistillError(f"model {model}: cannot read its config.json ({exc})") from None


# Families whose norm modules compute (1 + weight) x normalised input in fp32 and cast
# after it, so that backward keeps the fp32 normalised values (Llama-style norms cast
# first and keep them in the compute dtype).
FP32_NORM_FAMILIES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")


def model_shape(base_config, expert_configs) -> ModelShape:
    from mergekit_prodistill.blocks import BlockRunner, model_class

    runner = BlockRunner(base_config, torch.device("meta"))
    params = dict(runner.layer(0).named_parameters())
    numels = [p.numel() for p in params.values()]
    hidden = base_config.hidden_size
    heads = base_config.num_attention_heads
    return ModelShape(
        num_layers=len(runner.attention_types),
        hidden=hidden,
        heads=heads,
        head_dim=getattr(base_config, "head_dim", None) or hidden // heads,
        intermediate=getattr(base_config, "intermediate_size", 4 * hidden),
        block_numel=sum(numels),
        block_tensors=len(numels),
        largest=max(numels),
        matmul_numel=sum(p.numel() for p in params.values() if p.dim() == 2),
        vocab=tuple(c.vocab_size for c in (base_config, *expert_configs)),
        tied=bool(getattr(base_config, "tie_word_embeddings", False)),
        attention_types=len(set(runner.attention_types)),
        head_norm_values=(heads + getattr(base_config, "num_key_value_heads", heads))
        * (getattr(base_config, "head_dim", None) or hidden // heads)
        if any(n.endswith(("q_norm.weight", "k_norm.weight")) for n in params) else 0,
        heap_share=sum(n for n in numels if 4 * n < HEAP_LIMIT) / sum(numels),
        norms=sum(n.endswith("layernorm.weight") for n in params),
        fp32_norms=model_class(base_config).__name__ in FP32_NORM_FAMILIES,
        eager_attention=runner.config._attn_implementation == "eager",
        softcap=getattr(base_config, "attn_logit_softcapping", None) is not None,
        rotary_tables=len(set(runner.attention_types)) if runner.rotary_per_type else 1,
    )


def workload(recipe, options, seed: int) -> Workload:
    """Every expert's batches, from its prompts, tokenised or estimated from length."""
    p = recipe.params
    batches, tokens, prompt_lengths, estimated = [], [], [], False
    for i, expert in enumerate(recipe.experts):
        try:
            tokenizer = calibration.load_tokenizer(expert.model, recipe.base,
                                                   options.trust_remote_code)
        except ProDistillError:
            tokenizer = None
        prompts, _ = calibration.expert_prompts(recipe, i, seed, tokenizer)
        if tokenizer is not None:
            lengths = [len(s) for s in calibration.tokenize(prompts, tokenizer, p.max_length,
                                                            f"model {expert.model}")]
        else:
            estimated = True
            lengths = [min(p.max_length, 1 + math.ceil(len(x) / CHARS_PER_TOKEN)) for x in prompts]
        prompt_lengths.append(tuple(lengths))
        # Each expert's continuation may add up to continue_tokens (the worst case).
        lengths = [n + (p.continue_tokens if p.epochs else 0) for n in lengths]
        made = calibration.make_batches([[0] * n for n in lengths], p.batch_size)
        batches.append(tuple(tuple(b.input_ids.shape) for b in made))
        tokens.append(sum(lengths))
    source = f"estimated at {CHARS_PER_TOKEN:g} characters per token" if estimated \
        else "tokenizer"
    return Workload(tuple(batches), tuple(tokens), source, tuple(prompt_lengths))


# --------------------------------------------------------------------------- the model


def saved_bytes(shape: ModelShape, rows: int, width: int, es: int) -> int:
    """Activations one batch's forward keeps for backward (read from transformers' blocks
    and checked with saved-tensor hooks in tests/test_plan.py), per token:

    * 6 hidden-size values in the compute dtype (the inputs of q/k/v, o, and the MLP's
      projections, the attention's q, k, v) and 4 intermediate-size ones (gate, up, the
      activation, the down projection's input);
    * per norm, its normalised output: in the compute dtype, or fp32 for Gemma's norms,
      which multiply by (1 + weight) before casting. A norm whose input needs a gradient
      also keeps that input in fp32: the second norm and each further one (Gemma2 and
      Gemma3 norm the attention and MLP outputs too); the block's input needs none;
    * q/k norms (Qwen3, Gemma3): their fp32 input and normalised output, per value.

    Per (query, key) pair, sdpa keeps the mask in the compute dtype; eager attention
    (soft-capped scores) keeps no mask but, per head, the fp32 probabilities, their copy
    in the compute dtype for the product with v (none in fp32), and the capped scores.
    """
    tokens = rows * width
    normed = 4 if shape.fp32_norms else es
    per_token = (6 * es + shape.norms * normed + 4 * (shape.norms - 1)) * shape.hidden \
        + 4 * es * shape.intermediate + (4 + normed) * shape.head_norm_values
    if shape.eager_attention:
        per_pair = shape.heads * (4 + (es if es < 4 else 0) + (es if shape.softcap else 0))
    else:
        per_pair = es
    return tokens * per_token + rows * width * width * per_pair


def context_bytes(shape: ModelShape, work: Workload, es: int) -> int:
    """What ``BlockRunner.context`` keeps for every batch of every expert: one mask per
    attention kind (bool for sdpa, the compute dtype for eager attention's additive mask),
    each rotary table's cos and sin (Gemma3 keeps one table per kind), and per token the
    padding mask (bool) and attention mask (int64)."""
    pair = 1 if not shape.eager_attention else es
    return sum(rows * width * width * pair * shape.attention_types
               + 2 * width * shape.head_dim * es * shape.rotary_tables + 9 * rows * width
               for bs in work.batches for rows, width in bs)


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
    """Forward FLOPs of one batch: the block's matmuls plus the attention products."""
    return rows * width * (2 * shape.matmul_numel + 4 * width * shape.heads * shape.head_dim)


def lambda_count(shape: ModelShape, experts: int, granularity: str) -> int:
    per_expert = {"element": shape.block_numel, "tensor": shape.block_tensors, "task": 1}
    return experts * per_expert[granularity]


def phase_bytes(shape, work, p, wb: List[int], stored_b: List[int], cb: int, cache_b: int,
                device_type: str, out_b: int):
    """Bytes of every memory term in every phase of one block (see the module doc)."""
    P, big, T = shape.block_numel, shape.largest, len(wb) - 1
    # A block read in another dtype than stored is converted from the shard's memory map,
    # whose pages stay mapped until the block is read.
    mapped = P * max(stored_b) if stored_b != wb else 0
    base = P * wb[0]
    deltas = sum(P * max(wb[0], w) for w in wb[1:])
    lam = lambda_count(shape, T, p.granularity)
    widest = max((b for bs in work.batches for b in bs), key=lambda b: b[0] * b[1])
    stream = sum(work.slots(i) for i in range(T)) * shape.hidden * cache_b
    embed = shape.hidden * shape.vocab[0]
    forward = forward_bytes(shape, *widest, cb)
    # Writing: the trained block is summed in fp32 tensor by tensor (8 bytes per element
    # beside each result: CPU kernels copy an input of another dtype to promote it); the
    # block as written (its unit) is held until its file is saved; then the block in the
    # compute dtype advances the merged stream.
    unit = P * out_b
    written = max(8 * big, P * cb + forward)
    if device_type == "cpu":  # the unit is freed before the block is cast
        written = max(written, unit) - unit
    return {
        "load": {
            # The last expert block being read, or the block merged at init for the loss
            # before training, whose sums of products (scalar coefficients keep the task
            # vectors' dtype) take up to three tensors at once.
            WEIGHTS: base + deltas + max(P * wb[-1], P * cb) + mapped,
            CACHE: STREAMS["load"] * stream,
            TRANSIENT: max(forward, (3 if T > 1 else 1) * big * max(wb)),
        },
        "train": {
            WEIGHTS: base + deltas + 2 * P * cb,
            LAMBDA: 16 * lam,
            CACHE: STREAMS["train"] * stream,
            TRANSIENT: training_step_bytes(shape, widest, p.granularity, cb, lam),
        },
        "write": {
            WEIGHTS: base + deltas + 4 * P,
            LAMBDA: 4 * lam,
            CACHE: STREAMS["write"] * stream,
            TRANSIENT: written,
            OUTPUT: unit,
        },
        "embed": {
            WEIGHTS: embed * (2 * wb[0] + sum(w + max(wb[0], w) for w in wb[1:])),
            CACHE: STREAMS["embed"] * stream,
            # merge() sums the products lambda_i tau_i: two more matrices at once.
            TRANSIENT: embed * max(wb) * min(2, T),
        },
        "head": head_bytes(shape, widest, p, wb, cb) | {CACHE: STREAMS["head"] * stream},
    }


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


def head_bytes(shape: ModelShape, widest: Tuple[int, int], p, wb: List[int], cb: int):
    """Training the final norm and LM head (head.py): the base head and every task vector,
    the merged head and a teacher's head in the compute dtype, lambda with its gradient
    and Adam state (the head's, when it is its own tensor), and per step the larger of
    one batch's fp32 logits (student and teacher log-probabilities and the KL's three
    temporaries) and 12 bytes per head element: the fp32 sums that build the merged head
    (up to three at once), or a backward beside every gradient: the merged head's
    gradient, its fp32 copy and its product with a task vector."""
    vh, T = shape.hidden * shape.vocab[0], len(wb) - 1
    trained = vh if not shape.tied else 0
    rows, width = widest
    return {
        WEIGHTS: vh * (wb[0] + sum(max(wb[0], w) for w in wb[1:]) + 2 * cb),
        LAMBDA: 16 * T * (trained + shape.hidden),
        TRANSIENT: max(5 * 4 * rows * width * shape.vocab[0], 3 * 4 * vh),
    }


def step_traffic(shape: ModelShape, wb: List[int], cb: int, lam: int) -> float:
    """Bytes read and written by one step's element-wise work (not the matmuls).

    Per weight element: building theta_0 + sum_i lambda_i tau_i in fp32 and casting it
    (about 12 bytes per expert + the reads), back-propagating every expert's batch into
    the merged block's gradient, the chain rule grad * tau_i (about 12 + weight bytes per
    expert), and Adam's passes over lambda, its gradient and moments (76 bytes).
    """
    P, T = shape.block_numel, len(wb) - 1
    element = 4 if lam >= P else 0  # element-wise lambda is read like a weight
    merge = P * (wb[0] + 8 + cb) + sum(P * (max(wb[0], w) + element + 12) for w in wb[1:])
    backward = 2 * T * P * cb
    chain = sum(P * (cb + 12 + max(wb[0], w)) for w in wb[1:])
    return merge + backward + chain + 76 * lam


def output_buffer(shape: ModelShape, out_b: int, shard_size: int) -> int:
    """The writer holds tensors until a shard is full: at most one shard (or tensor)."""
    embed = shape.hidden * shape.vocab[0]
    total = out_b * (shape.num_layers * shape.block_numel + embed * (1 if shape.tied else 2))
    largest = out_b * max(embed, shape.largest)
    return min(total, max(largest, shard_size) if shard_size > 0 else total)


def cache_settings(recipe, device: torch.device, compute: str) -> Tuple[str, Optional[str]]:
    """The activation dtype (:func:`dtypes.activation_dtype`) and directory the merge will
    use. No directory means the scratch folder inside the output's staging folder when the
    streams must go to disk.
    """
    return dtypes.activation_dtype(recipe.params.activation_dtype, compute, device), \
        recipe.params.activation_dir


def cache_placement(device: torch.device, totals: Dict[str, int],
                    free: Dict[str, Optional[int]]) -> str:
    """Where the activation cache goes: on the device if it fits there beside the rest,
    else in (pinned) CPU memory if it fits there, else in a disk-backed file.

    ``totals`` holds the compute device's peak bytes with the cache on it ("device") and
    without it ("rest"), and the CPU's peak with the cache on it ("cpu"); ``free`` maps
    device names to their free bytes. When even the rest does not fit, the cache stays on
    the device: moving it would not help, and the check names the knob to turn.
    """
    dev = str(device)
    if free.get(dev) is None or totals["device"] <= free[dev]:
        return dev
    if device.type != "cpu" and (free.get("cpu") is None or totals["cpu"] <= free["cpu"]):
        return "cpu"
    return "disk" if totals["rest"] <= free[dev] else dev


# --------------------------------------------------------------------------- the plan


def make_plan(recipe, options, available: Optional[Dict[str, Optional[int]]] = None) -> Plan:
    """Plan ``recipe`` under ``options`` from configs and prompts alone.

    ``available`` maps a device name to the bytes free on it (default: what this machine
    shows); the cache is placed according to it.
    """
    p = recipe.params
    device = torch.device(options.device or "cpu")
    seed = options.random_seed if options.random_seed is not None else 0
    trust = options.trust_remote_code
    base_config = load_config(recipe.base, trust)
    check_supported(base_config.architectures, base_config.to_dict(), f"model {recipe.base}")
    expert_configs = [load_config(e.model, trust) for e in recipe.experts]
    shape = model_shape(base_config, expert_configs)
    stored = [dtypes.stored_dtype(m, c)
              for m, c in zip([recipe.base] + [e.model for e in recipe.experts],
                              [base_config] + expert_configs)]
    loaded = [recipe.dtype or s for s in stored]
    wb = [dtype_bytes(d) for d in loaded]
    compute = loaded[0]
    cache_dtype, _ = cache_settings(recipe, device, compute)
    out = recipe.out_dtype or compute
    work = workload(recipe, options, seed)

    per_phase = phase_bytes(shape, work, p, wb, [dtype_bytes(d) for d in stored],
                            dtype_bytes(compute),
                            dtype_bytes(cache_dtype), device.type, dtype_bytes(out))
    if not p.epochs:
        del per_phase["train"]  # no merged block, gradients or Adam state
    if not (p.epochs and p.head_epochs):
        del per_phase["head"]
    contexts = context_bytes(shape, work, dtype_bytes(compute))
    buffer = output_buffer(shape, dtype_bytes(out), options.out_shard_size)
    if p.epochs:
        # Each finished unit goes to its own file (progress.py): only the block being
        # written is held; the shards are assembled from those files at the very end.
        per_phase["assemble"] = {OUTPUT: buffer}
    else:
        for terms in per_phase.values():  # streamed: the writer holds up to a shard
            terms[OUTPUT] = buffer

    dev = str(device)
    if available is None:
        available = {dev: available_memory(device), "cpu": available_memory(torch.device("cpu"))}
    split = {at: place(per_phase, contexts, dev, at, shape.heap_share)
             for at in (dev, "cpu", None)}
    cache_at = cache_placement(device, {"device": peak_total(split[dev], dev),
                                        "cpu": peak_total(split["cpu"], "cpu"),
                                        "rest": peak_total(split[None], dev)}, available)
    phases = split.get(cache_at, split[None])
    generating = continuation_plan(recipe, expert_configs, wb[1:], work, device, available,
                                   trust)
    if generating:
        add_continuation_phase(phases, dev, max(generating, key=Generation.device_total),
                               shape.heap_share)

    fwd = [[batch_flops(shape, r, w) for r, w in bs] for bs in work.batches]
    steps = max(len(bs) for bs in work.batches)
    epochs = p.epochs_for(steps)
    per_step = 3 * sum(sum(f) / len(f) for f in fwd)  # forward + backward = 3 forwards
    evals = 3 if p.epochs else 2  # teacher outputs, loss before training, new stream
    lam = lambda_count(shape, len(recipe.experts), p.granularity)
    checkpoint = [shape.num_layers * shape.block_numel
                  + shape.hidden * v * (1 if shape.tied else 2) for v in shape.vocab]
    return Plan(
        recipe=recipe,
        shape=shape,
        work=work,
        dtypes={"weights": compute, "compute": compute, "cache": cache_dtype, "output": out},
        device=dev,
        cache_at=cache_at,
        phases=phases,
        flops={
            "training": shape.num_layers * epochs * steps * per_step
            # the head: forward + backward of a hidden x vocabulary matmul per token
            + (p.head_epochs * 3 * 2 * shape.hidden * shape.vocab[0] * sum(work.tokens)
               if p.epochs else 0),
            "forwards": shape.num_layers * evals * sum(sum(f) for f in fwd),
            "continuation": sum(g.flops for g in generating),
            "steps": steps,
            "epochs": epochs,
        },
        moved_bytes=shape.num_layers * epochs * steps
        * step_traffic(shape, wb, dtype_bytes(compute), lam),
        io_bytes=sum(n * dtype_bytes(d) for n, d in zip(checkpoint, stored))
        + checkpoint[0] * dtype_bytes(out),
        cache_bytes=max(t.get(CACHE, 0) for t in per_phase.values()),
        available=available,
        generation=[g.placement for g in generating],
        # Generating reads each expert's checkpoint once more to load it.
        continuation_reads={
            "load": sum(n * dtype_bytes(d) for n, d in zip(checkpoint[1:], stored[1:])),
            **{k: sum(g.reads[k] for g in generating) for k in ("device", "host", "disk")},
        } if generating else {},
    )


@dataclass(frozen=True)
class Generation:
    """One expert's continuation pass, as ``continuation.place_expert`` places it."""

    placement: continuation.Placement
    flops: float
    reads: Dict[str, float]  # bytes of weights read for all forward passes, by where from

    def device_total(self) -> int:
        return self.placement.device_bytes + self.placement.generation_bytes


def continuation_plan(recipe, expert_configs, weight_bytes: List[int], work: Workload,
                      device: torch.device, available: Dict[str, Optional[int]],
                      trust_remote_code: bool) -> List[Generation]:
    """Every expert's generation pass; none without ``continue_tokens`` or training."""
    p = recipe.params
    if not (p.epochs and p.continue_tokens):
        return []
    passes = []
    for config, es, lengths in zip(expert_configs, weight_bytes, work.prompt_lengths):
        shape = continuation.expert_shape(config, es, trust_remote_code)
        placed = continuation.place_expert(shape, lengths, p.continue_tokens, device, available)
        forwards = placed.batches * p.continue_tokens  # the prefill and one per new token
        passes.append(Generation(
            placed, continuation.generation_flops(shape, placed, lengths, p.continue_tokens),
            {"device": forwards * (shape.weight_bytes - placed.host_bytes - placed.disk_bytes),
             "host": forwards * placed.host_bytes, "disk": forwards * placed.disk_bytes}))
    return passes


def add_continuation_phase(phases, dev: str, generation: Generation, heap_share: float):
    """The continuation phase on the device (and on the CPU for what is offloaded there).

    It runs before the block loop: no streams, masks or output buffer exist yet.
    """
    placed = generation.placement
    phases[dev]["continuation"] = {EXPERT: placed.device_bytes,
                                   GENERATION: placed.generation_bytes}
    if dev != "cpu":
        phases["cpu"]["continuation"] = {EXPERT: placed.host_bytes}
    for device in {dev, "cpu"}:
        terms = phases[device]["continuation"]
        terms[SLACK] = slack(device, terms, heap_share)


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


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes this process can still allocate on ``device``; None when it cannot be told."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    # A container's memory limit (cgroup v2) can be tighter than the machine's.
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            used = int(f.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


KNOBS = {
    WEIGHTS: "run on a device with more memory (--device / --cuda) or set 'dtype: bfloat16'",
    LAMBDA: "run on a device with more memory (--device / --cuda), merge fewer experts at "
    "once, or set 'granularity: tensor'",
    CACHE: "lower 'shots' or 'max_length', or store the cache in a smaller dtype or in an "
    "activation directory on disk",
    CONTEXTS: "lower 'shots' or 'max_length'",
    TRANSIENT: "lower 'batch_size' or 'max_length'",
    EXPERT: "run on a device with more memory (--device / --cuda) or set 'dtype: bfloat16'",
    GENERATION: "lower 'continue_tokens' or 'max_length'",
    OUTPUT: "lower --out-shard-size",
}


def check_fits(recipe, options) -> Plan:
    """Refuse to start a merge whose plan exceeds the memory this machine shows."""
    plan = make_plan(recipe, options)
    for device, free in plan.available.items():
        if device not in plan.phases or free is None or plan.total(device) <= free:
            continue
        phase, terms = plan.peak(device)
        largest = max((t for t in terms if t != SLACK), key=terms.get)
        parts = ", ".join(f"{t} {fmt_bytes(v)}" for t, v in terms.items() if v)
        raise ProDistillError(
            f"plan: the merge needs {fmt_bytes(plan.total(device))} on {device} while "
            f"{PHASES[phase]} ({parts}) but {fmt_bytes(free)} is free; the largest part "
            f"is the {largest}: {KNOBS[largest]} (see mergekit-prodistill plan)"
        )
    for expert, placed in zip(recipe.experts, plan.generation):
        placed.check(torch.device(plan.device), expert.model)
    if plan.cache_at == "disk":
        _, directory = cache_settings(recipe, torch.device(plan.device), plan.dtypes["compute"])
        directory = directory or tempfile.gettempdir()
        free = shutil.disk_usage(directory).free
        if free < plan.cache_bytes:
            raise ProDistillError(
                f"plan: the activation cache needs {fmt_bytes(plan.cache_bytes)} but neither "
                f"memory nor {directory} ({fmt_bytes(free)} free) can hold it; lower 'shots' "
                "or 'max_length', or place the activation directory on a larger disk"
            )
    return plan
