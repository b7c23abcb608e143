"""The engine owns a parallelised model's split-sensitive layers for as long as it is parallelised.

A model keeps changing after `parallelize`: a LoRA is loaded (peft wraps convs and linears and
adds convs of its own), an IP-Adapter (new attention processors, an image projection), a
processor is set (`set_attn_processor`, `enable_attention_slicing`, `fuse_qkv_projections`).
Each of those could put a layer that sees only its strip where the whole image is needed, and
give a wrong image without an error. So before every split call the model is asked whether it
changed since the engine last looked, which costs one flag and one identity test per attention:

- a torch hook sees every module registered on one of the model's modules (a new or replaced
  submodule, a processor that is a module);
- each attention's processor is compared with the one the engine left there;
- the adapter's switches (settings such as FreeU's that change which layers exchange) compared.

If it changed, the adapter checks the model again (refusing what cannot be split, by name) and
installs its layers on what is new; the exchange layout and CUDA graphs of the old model are
dropped, and the call starts a new image (a synchronous step). `ParallelForward` makes every rank
agree on the outcome before the first collective of an image.
"""

from __future__ import annotations

import weakref

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from ..engine.hooks import inner_forward, refuse_hooks, weights_direct
from ..engine.state import ParallelState
from ..models import ModelAdapter


class Ownership:
    """Which modules and processors of one model the engine has seen, and whether that still holds."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, state: ParallelState) -> None:
        self.model, self.adapter, self.state = model, adapter, state
        self.changed = False
        self.layers = 0
        """How many patch-parallel layers the model has: every rank must have as many."""
        self._modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._processors: list[tuple[nn.Module, object]] = []
        this = weakref.ref(self)  # the global hook must not keep the model alive

        def registered(parent: nn.Module, name: str, child) -> None:
            owner = this()
            if owner is not None and parent in owner._modules:
                owner.changed = True

        self._hook = register_module_module_registration_hook(registered)
        weakref.finalize(self, self._hook.remove)

    def install(self) -> None:
        """Check the model and install the adapter's layers on whatever lacks them."""
        self.adapter.check_model(self.model)
        self.adapter.install(self.model, self.state)
        modules = list(self.model.modules())
        self._modules = weakref.WeakSet(modules)
        attentions = [m for m in modules if hasattr(m, "set_processor") and getattr(m, "processor", None) is not None]
        self._processors = [(m, m.processor) for m in attentions]
        owned = [inner_forward(m) for m in modules] + [p for _, p in self._processors]
        self.layers = sum(getattr(layer, "state", None) is self.state for layer in owned)
        self._switches = self.adapter.switches(self.model)
        self.state.direct_weights = weights_direct(self.model)
        self.changed = False

    def check_hooks(self) -> ValueError | None:
        """Before each image: the refusal of a hook the engine cannot run under, enabled since it last looked
        (`distrifusion.engine.hooks.refuse_hooks`), for every rank to raise alike; and whether the layers may
        still read weights directly (a hook or quantisation added since)."""
        try:
            refuse_hooks(self.model)
        except ValueError as refusal:
            return refusal
        self.state.direct_weights = weights_direct(self.model)
        return None

    def intact(self) -> bool:
        """Whether the model is as the engine left it (cheap: a flag, one identity per attention, the switches)."""
        return (
            not self.changed
            and all(module.processor is processor for module, processor in self._processors)
            and self.adapter.switches(self.model) == self._switches
        )

    def close(self) -> None:
        self._hook.remove()
