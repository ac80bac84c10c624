"""The context a technique's `step(ctx)` runs in. Each backend provides one; the step is the same.

A step asks the context for its models (built as the plan says: dtype, LoRA/QLoRA, checkpointing),
their optimizers, token ids, and marks the phases of the program. Everything a user's training loop
keeps through the step (the variable holding its output) is kept with `keep`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Iterator


class StepContext(ABC):
    """What `Technique.step(ctx)` may use. `plan` is the validated Plan; `step_index` counts from 0."""

    plan: Any
    step_index: int = 0

    @abstractmethod
    def model(self, role: str) -> Any:
        """The model playing `role` in the technique's workload, built once."""

    @abstractmethod
    def optimizer(self, role: str) -> Any:
        """The optimizer over the trainable parameters of the model playing `role`, built once."""

    @abstractmethod
    def token_ids(self, batch: int, seq: int) -> Any:
        """Random token ids (int64, batch x seq) on the run's device."""

    @abstractmethod
    def generate(self, model: Any, ids: Any, new_tokens: int) -> Any:
        """`model.generate(ids, attention_mask=ones, max_new_tokens=n, min_new_tokens=n, do_sample=False)`."""

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark a phase (forward, backward, optimizer, ...). Forward phases run under the plan's
        autocast (mixed precision, QLoRA's bf16 compute), as the HF Trainer runs them."""
        self._enter_phase(name)
        with self._autocast() if name == "forward" else contextlib.nullcontext():
            yield

    def device_kernels(self, library: str) -> Any:
        """A context in which `library`'s CUDA kernels behave as on a GPU. A GPU backend runs the
        library's own kernels (a null context); CPU backends emulate their allocations."""
        return contextlib.nullcontext()

    def autocast(self) -> Any:
        """The plan's autocast context, for a forward outside a "forward" phase that a trainer still
        runs under autocast (TRL's DPOTrainer scores the reference inside `compute_loss`)."""
        return self._autocast()

    def _enter_phase(self, name: str) -> None:
        self.current_phase = name

    @abstractmethod
    def _autocast(self) -> Any:
        """The plan's autocast context (a null context when the plan computes in its weights' dtype)."""

    def keep(self, obj: Any, slot: str = "out") -> None:
        """Hold `obj` as a step's local variable does: until the step ends (the backends release
        what a step kept when it returns; the measured programs run each step as a function, see
        docs/allocator.md). Keeping another object in the slot releases the previous one now."""
        kept = self.__dict__.setdefault("_kept", {})
        kept[slot] = obj

    def backward(self, loss: Any) -> None:
        """A micro-batch's `loss.backward()`: with the plan's grad_accum > 1 micro-batches a step,
        `(loss / grad_accum).backward()` (a 0-dim quotient; the gradients add up to the step's mean)."""
        accum = getattr(self.plan, "grad_accum", 1)
        (loss if accum == 1 else loss / accum).backward()

    def empty_cache(self) -> None:
        """`torch.cuda.empty_cache()` (RL trainers call it between generation and training): the
        caching allocator returns every wholly free cached segment to the driver. On a GPU backend
        the real call; the traced CPU backends record it in the allocation trace."""

    def release(self) -> None:
        self.__dict__.get("_kept", {}).clear()
