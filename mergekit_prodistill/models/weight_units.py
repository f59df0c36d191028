"""The checkpoint's tensors in the order the merge walks them: the input embedding (and
what computes per-layer inputs), each decoder block, then everything after the blocks (the
final norm and the LM head).

A multimodal checkpoint's units are its language model's: the text decoder of mergekit's
layout, or, where mergekit infers the layout, its decoder's stack of layers and the
tensors around it that the transformers model's module tree puts in the decoder. Its
other tensors (vision tower, projector) are merged by task arithmetic in the first unit,
beside the embedding, by the names they are stored under.

mergekit describes a model's tensors as the weights before the blocks, each block's, and
the weights after them. For families on its list that grouping is written down; for the
others it infers the tensor names from the transformers model built on the meta device
and puts every tensor outside the blocks before them, in an order that changes from one
Python process to the next. Here the grouping comes from the model's own modules, the
same for every family: its input embedding comes first and everything else outside the
blocks after them; each group in the order the model's modules register their tensors,
so that every process of a merge lists the same tensors in the same order.
"""

from typing import Dict, Iterable, List

from mergekit.architecture import ConfiguredModelArchitecture, WeightInfo
from mergekit.architecture.conversion import can_convert_checkpoint_keys
from mergekit.common import ModelReference

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.models.blocks import decoder_of
from mergekit_prodistill.models.families import (PER_LAYER_INPUT_MODULES, meta_model,
                                                 vocabulary_indexed)
from mergekit_prodistill.models.model_files import ModelFiles, TensorInfo

# mergekit's name for the language model among a multimodal layout's modules.
LANGUAGE_MODULE = "text_decoder"


def is_multimodal(config) -> bool:
    return config.get_text_config() is not config


def _embedding(skeleton, prefix: str = "") -> str:
    """The input embedding's name in ``skeleton`` (under ``prefix``)."""
    matrix = skeleton.get_input_embeddings().weight
    return prefix + next(n for n, p in skeleton.named_parameters() if p is matrix)


def _named(weight: WeightInfo) -> set:
    return {weight.name, *(weight.aliases or ())}


def _language_model(model_arch: ConfiguredModelArchitecture):
    """mergekit's module holding the language model's blocks, the language model's
    tensors outside them (as mergekit names them), and the language model's tensors as
    its transformers model registers them, under the names they are stored by; and the
    input embedding's name.

    One module for a text model; a multimodal layout's text decoder (its names under a
    prefix); or, where mergekit infers a multimodal layout (one module per stack of
    layers), the module of the decoder's layers, with the rest told apart by the
    transformers model's own module tree.
    """
    config, modules = model_arch.config, model_arch.info.modules
    if not is_multimodal(config):
        module, skeleton = model_arch.get_module("default"), meta_model(config)
        return (module, [*module.pre_weights(), *module.post_weights()],
                skeleton.state_dict(keep_vars=True), _embedding(skeleton))
    if LANGUAGE_MODULE in modules:
        module = model_arch.get_module(LANGUAGE_MODULE)
        text = meta_model(config.get_text_config())
        # The text model's names under the layout's: by where it puts the embedding
        # (Qwen2.5-VL's under "model.", Qwen3-VL's under "model.language_model.", with
        # the text model built as its decoder alone).
        own = _embedding(text)
        laid = next((w.name for w in module.pre_weights() if w.name.endswith(own)), None)
        prefix = laid[:-len(own)] if laid else module.weight_prefix or ""
        state = {prefix + n: t for n, t in text.state_dict(keep_vars=True).items()}
        return (module, [*module.pre_weights(), *module.post_weights()], state,
                _embedding(text, prefix))
    skeleton = meta_model(config)
    decoder = decoder_of(skeleton)
    path = next(n for n, m in skeleton.named_modules() if m is decoder)
    if f"{path}.layers" not in modules or "default" not in modules:
        name = "/".join(config.architectures or [config.model_type])
        raise ProDistillError(
            f"architecture {name}: mergekit's layout of it names no stack of layers "
            f"'{path}.layers', so its language model's blocks cannot be told apart")
    head = skeleton.get_output_embeddings()
    own = {*(f"{path}.{n}" for n in decoder.state_dict(keep_vars=True)),
           *(n for n, p in skeleton.named_parameters(remove_duplicate=False)
             if head is not None and p is head.weight)}
    state = {n: t for n, t in skeleton.state_dict(keep_vars=True).items() if n in own}
    default = model_arch.get_module("default")
    outside = [w for w in [*default.pre_weights(), *default.post_weights()] if w.name in own]
    return model_arch.get_module(f"{path}.layers"), outside, state, _embedding(skeleton)


class WeightUnits:
    """mergekit's configured module of the base's language model, regrouped (see the
    module doc); ``stored`` names the base's stored tensors."""

    def __init__(self, model_arch: ConfiguredModelArchitecture, stored: Iterable[str] = ()):
        module, outside, state, embedding = _language_model(model_arch)
        self.module = module
        self.info = module.info
        self.config = model_arch.config
        # The tensors the model loads, in the order its modules register them, and the
        # names each shares its tensor with (a tied LM head is the embedding).
        self._order = {name: i for i, name in enumerate(state)}
        self._same = {name: {n for n, u in state.items() if u is t} for name, t in state.items()}
        outside = self._ordered(outside)
        # Before the blocks: what starts the streams (the embedding, the per-layer inputs).
        before = [w for w in outside
                  if embedding in _named(w) or PER_LAYER_INPUT_MODULES & set(w.name.split("."))]
        self._post = [w for w in outside if w not in before]
        indexed = vocabulary_indexed(model_arch.config)
        self._pre = [w.model_copy(update={"vocabulary_axis": 0})
                     if indexed.keys() & set(w.name.split(".")) else w for w in before]
        self.towers: List[str] = []  # the parts outside the language model, by name
        if is_multimodal(model_arch.config):
            others = [WeightInfo(name=n) for n in sorted(set(stored) - self._held())
                      if n not in self._order]
            self._pre += others
            self.towers = sorted({n.removeprefix("model.").split(".")[0]
                                  for n in (w.name for w in others)})

    def num_layers(self) -> int:
        return self.module.num_layers()

    def pre_weights(self) -> List[WeightInfo]:
        return list(self._pre)

    def layer_weights(self, index: int) -> List[WeightInfo]:
        return self._ordered(self.module.layer_weights(index))

    def post_weights(self) -> List[WeightInfo]:
        return list(self._post)

    def _ordered(self, weights: List[WeightInfo]) -> List[WeightInfo]:
        """In the model's own order; names it does not register last, by name."""
        return sorted(weights, key=lambda w: (self._order.get(w.name, len(self._order)), w.name))

    def _held(self) -> set:
        return {n for w in self.all_weights()
                for n in (w.name, *(w.aliases or ()), *(w.tied_names or ()))}

    def dropped(self, checkpoint_names) -> List[str]:
        """The checkpoint's tensors that the model loads and no unit merges."""
        merged = self._held()
        return sorted(n for n in checkpoint_names
                      if n in self._order and not self._same[n] & merged)

    def all_weights(self) -> List[WeightInfo]:
        blocks = (w for i in range(self.num_layers()) for w in self.layer_weights(i))
        return [*self._pre, *blocks, *self._post]


def converted(weight: WeightInfo, *models: ModelFiles) -> bool:
    """Whether transformers builds the tensor from others that every model stores (a
    mixture of experts' fused matrices, from one matrix per expert), as mergekit reads it."""
    return all(can_convert_checkpoint_keys(m.config.model_type, set(m.tensors), weight.name)
               for m in models)


def stored_for_conversion(weights, files: ModelFiles) -> Dict[str, TensorInfo]:
    """The decoder blocks' stored tensors that no weight names, when some weight is built
    from stored ones: those the conversions read."""
    if not any(w.name not in files.tensors and converted(w, files) for w in weights):
        return {}
    named = {n for w in weights for n in (w.name, *(w.aliases or ()), *(w.tied_names or ()))}
    return {n: t for n, t in files.tensors.items() if ".layers." in n and n not in named}


def check_stored_alike(recipe, models: Dict[ModelReference, ModelFiles], weights) -> None:
    """Tensors read through a conversion (one matrix per expert): every expert stores the
    base's, with the base's shapes."""
    base = models[recipe.base]
    for name, info in stored_for_conversion(weights, base).items():
        for expert in recipe.experts:
            other = models[expert.model].tensors.get(name)
            if other is None:
                raise ProDistillError(f"model {expert.model} has no tensor {name}")
            if other.shape != info.shape:
                raise ProDistillError(
                    f"tensor {name}: model {expert.model} has shape {other.shape} but the base "
                    f"model has {info.shape}; experts must be fine-tuned from the base")
