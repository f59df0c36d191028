"""The coefficients' optimiser and the element-wise work of a training step.

Gradients reach lambda_i as dL/dW * tau_i, so their size follows the task vectors' size
(~1e-3 per element in real fine-tunes), the model's width and the loss's scale: raw
values of 1e-11 to 1e-9 at 13B shapes, near Adam's usual eps, where Adam turns into plain
SGD with steps proportional to tau squared. :class:`Optimizer` therefore runs Adam on
gradients measured in units of their own RMS at the first step (per tensor and expert),
which makes every step independent of those scales.

:class:`TrainingStep` holds the merged weights a step back-propagates into and, after the
backward, applies the chain rule, Adam and the sum theta_0 + sum_i lambda_i tau_i for the
next step in one pass per weight tensor, chunk by chunk, so that each weight, task vector
and coefficient state is read once per step rather than once per operation.
"""

import logging
import math
from typing import Dict, List

import torch

from mergekit_prodistill.errors import one_line
from mergekit_prodistill.parallel import SINGLE, World

LOG = logging.getLogger("mergekit_prodistill")

# Adam's eps in units of each tensor's first-step gradient RMS: elements whose gradient
# stays far below the typical one move little, the rest by about the learning rate.
ADAM_EPS = 1e-2
BETAS = (0.9, 0.999)
# Adam moves every coefficient by about lr per step, all in the direction that lowers the
# loss, so a weight's output moves by the sum over its inputs: n-fold for n inputs, while
# the error being corrected (a sum of independent task-vector terms) grows only sqrt(n)-
# fold. Element-wise coefficients of a weight with more than FAN_IN_REF inputs per output
# therefore step by lr * sqrt(FAN_IN_REF / inputs): the same share of the error per step
# at every width (at hidden 1024 the unscaled first steps raised the loss tenfold).
FAN_IN_REF = 64
# Elements per chunk of the fused pass. On CPU its four fp32 intermediates (4 MiB each)
# stay in a 32 MiB L3 cache. On 2 cores a 13824 x 5120 tensor took 0.18 s at 2^18, 0.25 s
# at 2^20 and 1.26 s as separate passes; 2^20 has a quarter of the operations, each a point
# where the threads wait for each other: far fewer stalls when other processes share the
# cores.
# On accelerators chunks only bound the scratch memory.
CHUNK_CPU = 1 << 20
CHUNK_DEVICE = 1 << 24
# Where the pass is one compiled kernel (:func:`compiled_elementwise_step`) instead. On
# CUDA each operation of the chunked pass is a kernel that reads and writes GPU memory
# (about 36 per chunk, 354 bytes per element with 3 experts); compiled, each input is read
# once and each output written once. On 2 CPU cores the compiled pass alone is faster
# (bench/fused_update.py: 0.19 s against 0.27 s for a 13824 x 5120 tensor, 2 experts), yet
# a whole 13B-shaped step is not (bench/flops.py: 0.81 of the matmul rate against 0.90),
# compiling takes ~30 s cold, and its fused multiply-adds would end the bit-for-bit match
# of several processes with one: the CPU keeps the chunked pass.
COMPILED_ON = ("cuda",)

Weights = Dict[str, torch.Tensor]


def width_factor(coefficient: torch.Tensor) -> float:
    """The share of lr an element-wise coefficient of a weight steps by (see FAN_IN_REF)."""
    inputs = coefficient.shape[-1] if coefficient.dim() >= 2 else 1
    return min(1.0, math.sqrt(FAN_IN_REF / inputs))


def adam_(lam, grad, m, v, lr: float, step: int, denom) -> None:
    """Adam's update of ``lam`` in place (torch.optim.Adam's formula, no weight decay) for
    ``grad`` in RMS units; ``denom`` is scratch of ``lam``'s shape. Plain floats only: no
    synchronisation with the device."""
    b1, b2 = BETAS
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    torch.sqrt(v, out=denom).div_(math.sqrt(1 - b2 ** step)).add_(ADAM_EPS)
    lam.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))


class Optimizer:
    """Adam on gradients in units of their first-step RMS, per tensor (scale-free), with
    steps scaled to the weights' widths (:func:`width_factor`).

    :meth:`small_gradients` counts the coefficients whose first gradient is below eps in
    those units: the ones Adam moves like SGD rather than by about ``lr``.
    """

    def __init__(self, params: List[torch.Tensor], lr: float):
        self.params = params
        self.lrs = [lr * width_factor(p) for p in params]
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.index = {id(p): i for i, p in enumerate(params)}
        self.eps = ADAM_EPS
        self.steps = 0
        self.scales = None
        self._small = None

    def step(self) -> None:
        """One step: Adam on the ``.grad`` of the parameters that have one (every one at
        the first step, which sets the units), then their ``.grad`` is dropped."""
        if self.scales is None:
            grads = [p.grad for p in self.params]
            # One norm per tensor, kept on the device: no synchronisation per step.
            rms = [n / math.sqrt(g.numel()) for n, g in zip(torch._foreach_norm(grads), grads)]
            self.scales = [torch.where(r > 0, 1 / r, torch.zeros_like(r)) for r in rms]
            self._small = sum(((g.abs() * s) < self.eps).sum() for g, s in zip(grads, self.scales))
        self.steps += 1
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is not None:
                    grad = p.grad * self.scales[i]
                    adam_(p, grad, *self.moments[i], self.lrs[i], self.steps,
                          torch.empty_like(p))
                    p.grad = None

    def state(self, p: torch.Tensor):
        """``p``'s moments, gradient scale and learning rate."""
        i = self.index[id(p)]
        return (*self.moments[i], self.scales[i], self.lrs[i])

    def small_gradients(self) -> List[float]:
        """[coefficients with a first gradient below eps, all coefficients]."""
        small = 0.0 if self._small is None else float(self._small)
        return [small, float(sum(p.numel() for p in self.params))]


def elementwise_step(grad, base, experts, step, leader: bool, adds: bool) -> torch.Tensor:
    """The fused pass over whole flattened tensors, as :meth:`TrainingStep._fused` does
    it chunk by chunk: Adam on every expert's coefficients in place, and the fp32 partial
    sum of the next merged weight (theta_0 on the leader, plus lambda_i tau_i where this
    process ``adds``). ``experts`` holds per expert (task vector, lambda, Adam's two
    moments, gradient scale, learning rate); the scale, the learning rate and ``step`` are
    0-dim tensors, so that a compiled version serves every step and tensor."""
    b1, b2 = BETAS
    g_w = grad.float()
    acc = base.float() if leader else torch.zeros_like(g_w)
    first_moment, second_moment = 1 - b1 ** step, torch.sqrt(1 - b2 ** step)
    for delta, lam, m, v, scale, lr in experts:
        g = g_w * delta * scale
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        lam.sub_(lr / first_moment * m / (torch.sqrt(v) / second_moment + ADAM_EPS))
        if adds:
            acc = acc + lam * delta
    return acc


_compiled = {}


def compiled_elementwise_step():
    """:func:`elementwise_step` compiled (at its first call, shapes dynamic), once per
    process; None once compiling it has failed (no compiler, no Triton)."""
    if "step" not in _compiled:
        _compiled["step"] = torch.compile(elementwise_step, dynamic=True)
    return _compiled["step"]


def training_weights(base_w, deltas, coeffs, dtype, world: World = SINGLE) -> Weights:
    """theta_0 + sum_i lambda_i tau_i for a training step, with fused in-place updates
    (fewer passes); the tensors with a trained coefficient take a gradient. Over several
    processes rank 0 starts its partial sum from theta_0, the others from zero."""
    with torch.no_grad():
        merged = {}
        for name, base in base_w.items():
            w = (base.to(torch.float32, copy=True) if world.leader
                 else torch.zeros(base.shape, dtype=torch.float32, device=base.device))
            for c, d in zip(coeffs, deltas if world.contributes else ()):
                w.add_(c[name] * d[name])  # no fused multiply-add: see TrainingStep
            world.sum_(w)
            merged[name] = w.to(dtype).requires_grad_(any(c[name].requires_grad for c in coeffs))
        return merged


def chain_rule(merged, deltas, coeffs, names) -> None:
    """Set lambda_i's gradient to dL/dW * tau_i from the merged weights' gradients."""
    for c, d in zip(coeffs, deltas):
        for name in names:
            coeff = c[name]
            grad = merged[name].grad.float() * d[name]
            grad = grad if coeff.dim() else grad.sum()
            coeff.grad = grad if coeff.grad is None else coeff.grad.add_(grad)


class TrainingStep:
    """The merged weights (``weights``, in ``dtype``) that a step back-propagates into,
    and :meth:`update`, which turns their gradients into the next step's weights.

    Over several processes (``world``) each holds its own experts' task vectors and
    coefficients: the weights' gradients are summed over processes before the chain rule,
    and each next merged weight is the sum of every process's partial sum. Each product
    lambda_i * tau_i is rounded before it is added (no fused multiply-add), so that two
    processes' partial sums add up to exactly one process's sum."""

    def __init__(self, base_w: Weights, deltas: List[Weights], coeffs: List[Weights],
                 dtype: torch.dtype, optimizer: Optimizer, world: World = SINGLE):
        self.base_w, self.deltas, self.coeffs = base_w, deltas, coeffs
        self.dtype, self.optimizer, self.world = dtype, optimizer, world
        self.weights = training_weights(base_w, deltas, coeffs, dtype, world)
        self.trained = [n for n, w in self.weights.items() if w.requires_grad]
        # Element-wise coefficients update tensor by tensor; scalar ones (tensor- or
        # task-wise) need every element's gradient first.
        self.elementwise = [n for n in self.trained if coeffs[0][n].dim()]
        self.scalar = [n for n in self.trained if not coeffs[0][n].dim()]
        self._scratch = self._partial = None
        device = next(iter(self.weights.values())).device
        self.compiled = device.type in COMPILED_ON and compiled_elementwise_step() is not None

    def update(self) -> None:
        """Chain rule, Adam and the next merged weights from the weights' gradients."""
        for weight in (self.weights[n] for n in self.trained if self.weights[n].grad is None):
            weight.grad = torch.zeros_like(weight)  # e.g. a router bias that only selects
        # Every process's experts' share of dL/dW, all sums started at once: each
        # tensor's pass waits for its own while the later ones are still being summed.
        summed = {name: self.world.sum_later(self.weights[name].grad) for name in self.trained}
        first = self.optimizer.scales is None
        names = self.trained if first else self.scalar
        for name in names:
            summed[name]()
        # The first step sets every tensor's gradient units from its whole gradient.
        chain_rule(self.weights, self.deltas, self.coeffs, names)
        self.optimizer.step()
        if names:
            self.weights.update(training_weights({n: self.base_w[n] for n in names},
                                                 self.deltas, self.coeffs, self.dtype,
                                                 self.world))
        if not first:
            for name in self.elementwise:
                summed[name]()
                self._fused(name)
        for w in self.weights.values():
            w.grad = None

    def _fused(self, name: str) -> None:
        """One pass over a tensor with element-wise coefficients: per chunk, the chain rule
        into scratch, Adam on every expert's coefficients, and the new merged weight, in
        the order and formulas of :func:`chain_rule`, :func:`adam_` and
        :func:`training_weights`. Over several processes the chunks fill an fp32 partial
        sum, which is summed over processes before it becomes the merged weight. Where
        :data:`COMPILED_ON` says, one compiled kernel does the whole tensor instead."""
        w = self.weights[name]
        grad, out, base = w.grad.reshape(-1), w.detach().view(-1), self.base_w[name].reshape(-1)
        w.grad = None
        experts = []
        for c, d in zip(self.coeffs, self.deltas):
            m, v, scale, lr = self.optimizer.state(c[name])
            experts.append((d[name].reshape(-1), c[name].detach().view(-1), m.view(-1),
                            v.view(-1), scale, lr))
        if self.compiled and self._compiled_pass(grad, base, out, experts):
            return
        size = CHUNK_CPU if out.device.type == "cpu" else CHUNK_DEVICE
        scratch = self.scratch(min(size, out.numel()), out.device)
        partial = self.partial(out.numel(), out.device) if self.world.distributed else out
        leader, adds, step = self.world.leader, self.world.contributes, self.optimizer.steps
        with torch.no_grad():
            for start in range(0, out.numel(), size):
                chunk = slice(start, start + size)
                g_w, g, denom, acc = (s[:min(size, out.numel() - start)] for s in scratch)
                g_w.copy_(grad[chunk])
                if leader:
                    acc.copy_(base[chunk])
                else:
                    acc.zero_()
                for delta, lam, m, v, scale, lr in experts:
                    torch.mul(g_w, delta[chunk], out=g).mul_(scale)
                    adam_(lam[chunk], g, m[chunk], v[chunk], lr, step, denom)
                    if adds:
                        acc.add_(torch.mul(lam[chunk], delta[chunk], out=g))
                partial[chunk].copy_(acc)
            if partial is not out:
                out.copy_(self.world.sum_(partial))

    def _compiled_pass(self, grad, base, out, experts) -> bool:
        """:meth:`_fused` by the compiled kernel; False (once per process, with a warning)
        where it cannot be compiled: the chunked pass is used from then on."""
        device = out.device
        experts = [(*tensors, torch.tensor(lr, dtype=torch.float32, device=device))
                   for *tensors, lr in experts]
        step = torch.tensor(float(self.optimizer.steps), dtype=torch.float32, device=device)
        try:
            acc = compiled_elementwise_step()(grad, base, experts, step, self.world.leader,
                                              self.world.contributes)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back
            LOG.warning("could not compile the training step's element-wise pass (%s); "
                        "using the chunked pass", one_line(exc)[:200])
            _compiled["step"] = None
            self.compiled = False
            return False
        out.copy_(self.world.sum_(acc) if self.world.distributed else acc)
        return True

    def partial(self, size: int, device) -> torch.Tensor:
        """An fp32 buffer of ``size`` elements for a partial sum, kept between tensors."""
        if self._partial is None or self._partial.numel() < size:
            self._partial = torch.empty(size, dtype=torch.float32, device=device)
        return self._partial[:size]

    def scratch(self, size: int, device) -> List[torch.Tensor]:
        """Four fp32 buffers of at least ``size`` elements, kept between tensors."""
        if self._scratch is None or self._scratch[0].numel() < size:
            self._scratch = [torch.empty(size, dtype=torch.float32, device=device)
                             for _ in range(4)]
        return self._scratch
