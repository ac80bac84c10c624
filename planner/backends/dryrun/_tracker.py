"""MemTracker adapted to replaying training/generation programs (imports torch: load lazily).

Changes to torch.distributed._tools.mem_tracker.MemTracker, each for a reason seen in practice:
- grad hooks only on parameters that require grad (it fails on frozen LoRA/QLoRA bases);
- ModTracker's pre-forward multi-grad hooks registered in "any" mode: in the default "all" mode
  the hook's closure keeps a reference cycle that holds the embedding output (a leaf made by
  `enable_input_require_grads()`) and its gradient alive every step, under the tracker only;
- every storage is rounded up to 512 bytes like CUDA's caching allocator (MemTracker rounds only
  for device "cuda", and our tensors live on the CPU);
- the global peak is taken per op with a snapshot of the categories, plus running totals of
  finer "details" (quantization states, KV cache, vocab-sized tensors...), the phase and the op;
- storages made while `alloc_exclude` is set (host-side on CUDA, paged/unified memory) are
  reported apart, not counted; views of storages the tracker never saw allocated (fake copies of
  real inputs) are not allocations.
"""

from __future__ import annotations

from collections import defaultdict
from copy import deepcopy
from functools import partial
from typing import Any, Callable

import torch
from torch.autograd.graph import register_multi_grad_hook
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _UpdateType
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._pytree import tree_flatten, tree_map_only

# ops that run cuBLAS on CUDA (F.linear and matmul decompose into them under dispatch)
_CUBLAS_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.addbmm.default,
}

CATEGORY_OF = {
    _MemRefType.PARAM: "parameters",
    _MemRefType.BUFFER: "buffers",
    _MemRefType.GRAD: "gradients",
    _MemRefType.ACT: "activations",
    _MemRefType.OPT: "optimizer_states",
    _MemRefType.TEMP: "temporaries",
    _MemRefType.OTH: "other",
}


def _okey(detail, reftype):
    """Category key of the origin totals: the KV cache is its own category, as in the breakdown."""
    return "kv_cache" if detail == "kv_cache" else reftype


def _fold_module_name(name: str) -> str:
    import re

    if name == "Global":
        return "(outside modules)"
    name = re.sub(r"\.\d+(?=\.|$)", ".*", name)
    i = name.find("layers.*")
    if i >= 0:
        return name[i:]
    parts = name.split(".")
    rest = [p for p in parts[1:] if p not in ("base_model", "model")] if len(parts) > 1 else []
    return ".".join(rest) if rest else "(model)"


class _AnyModeModTracker(ModTracker):
    """ModTracker whose pre-forward (post-backward marker) multi-grad hooks use mode="any"."""

    def _fw_pre_hook(self, mod, input):  # noqa: A002 - signature of the parent
        if torch._dynamo.eval_frame._is_in_optimized_module():
            return
        name = self._get_mod_name(mod)
        import weakref

        w_mod = weakref.ref(mod)
        self._get_append_fn(w_mod, name, False)()
        if self._user_pre_fw_hook is not None:
            self._user_pre_fw_hook(mod, input)
        args, _ = tree_flatten(input)
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if not self.is_bw:
            if tensors:
                register_multi_grad_hook(tensors, self._get_pop_fn(w_mod, name, True), mode="any")
            else:
                self._post_bw_callbacks_to_enqueue.append(self._get_pop_fn(w_mod, name, True))


def setup_order(model) -> tuple[list[torch.Tensor], int, list[torch.Tensor]]:
    """The real set-up's allocation order and the untied output embedding it frees.

    `AutoModelForCausalLM.from_config` allocates the base model's parameters in registration
    order, then its buffers (rotary tables), then the lm_head weight; with tied embeddings
    `post_init` then replaces that weight with the input embedding's, freeing it (seen by logging
    aten.empty under a dispatch mode while building a tied Llama with transformers 5.25). peft
    adds the adapters afterwards, module by module. Returns (base tensors and buffers in order,
    bytes of the freed untied weight or 0, adapter tensors)."""
    base, adapters = [], []
    for name, p in model.named_parameters():
        (adapters if "lora_" in name else base).append(p)
    buffers = [b for _n, b in model.named_buffers()]
    untied = 0
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
        w = out_emb.weight
        untied = w.numel() * w.element_size()
    return base + buffers, untied, adapters


class DryRunTracker(MemTracker):
    def __init__(self, round_bytes: int = 512) -> None:
        super().__init__()
        self._mod_tracker = _AnyModeModTracker()
        self.round_bytes = round_bytes
        self._phase = "setup"
        # the allocation trace (planner.engine.allocator's events), when `record_trace()` was called
        self.trace: list[tuple] | None = None
        self._trace_ids = 0
        # storages of the set-up (model, adapters) enter the trace through `trace_setup`, in the
        # order the real program makes them; everything after `start_trace_program()` as it happens
        self._trace_setup_done = False
        self._accumulation: tuple | None = None
        self.accumulations_in_place = 0
        self.kernel_workspaces: Callable[[Any, tuple], list[int]] | None = None
        # cuBLAS workspaces: (thread, bytes) allocated at the first matmul of each thread
        self.workspaces: dict[str, int] = {}
        self._workspaces_made: set[str] = set()
        self.step = -1
        self.total = 0
        self.detail_totals: dict[tuple[str, Any], int] = defaultdict(int)
        self.outside: dict[str, int] = defaultdict(int)
        self.phase_peaks: dict[str, int] = {}
        self.peak_total = 0
        self.peak_categories: dict[Any, int] = {}
        self.peak_details: dict[tuple[str, Any], int] = {}
        self.peak_phase = "setup"
        self.peak_step = -1
        self.peak_op = ""
        self.peak_extra: dict[str, int] = {}
        # context detail for storages created now (e.g. "kv_cache" inside a cache update)
        self.alloc_detail: str | None = None
        # fn(func, args, out_tensor) -> detail name or None, for storages created by dispatched ops
        self.classifier: Callable[[Any, tuple, torch.Tensor], str | None] | None = None
        # fn() -> dict of extra figures computed at each new global peak (cheap!)
        self.at_peak: Callable[[], dict[str, int]] | None = None
        # storages created while this is set are outside the allocator (paged/unified memory)
        self.alloc_exclude: str | None = None
        self._pending_detail: str | None = None
        self._pending_alias = False
        # answers to host-side reads of fake tensors (.item(), bool()), see _programs.ScalarOracle
        self.oracle = None
        self.origin_totals: dict[tuple[str, Any], int] = defaultdict(int)
        self.peak_origins: dict[tuple[str, Any], int] = {}
        self.origin_context: str | None = None
        self._op_names: dict[Any, str] = {}
        self._mod_names: dict[str, str] = {}
        self._alias_ops: dict[Any, bool] = {}
        self._cur_func = None
        self._cur_args: tuple = ()
        self.op_count = 0

    # ---- phase and allocation trace -------------------------------------------------------
    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        if self.trace is not None and name != self._phase:
            self.trace.append(("phase", f"{self.step}.{name}"))
        self._phase = name

    def record_trace(self, workspaces: dict[str, int] | None = None, before_setup: bool = False,
                     kernel_workspaces: Callable[[Any, tuple], list[int]] | None = None) -> None:
        """Record allocate/free events of every counted storage from now on (`self.trace`).
        `workspaces`: {"forward": bytes, "backward": bytes}: a cuBLAS workspace allocated after the
        first matmul of the forward thread and of autograd's device thread (CublasHandlePool.cpp's
        getNewWorkspace goes through the caching allocator when a handle first meets a stream);
        before_setup: the process ran matmuls before (the workspaces exist before the model);
        kernel_workspaces: fn(func, args) -> sizes a CUDA kernel allocates and frees inside the op
        (planner.backends.dryrun.kernel_workspaces), traced right after the op's outputs."""
        self.trace = []
        self.workspaces = dict(workspaces or {})
        self.kernel_workspaces = kernel_workspaces
        if before_setup:
            for thread in ("forward", "backward"):
                size = self.workspaces.get(thread, 0)
                if size:
                    self._workspaces_made.add(thread)
                    self._trace_new(size)

    def trace_model_setup(self, model, quant_state_tensors=()) -> None:
        """A model's set-up allocations, in the order the real build makes them (see
        `setup_order`): base parameters and buffers, the untied output embedding allocated and freed
        when the build ties it, quantization states, adapters."""
        if self.trace is None:
            return
        base, untied, adapters = setup_order(model)
        self.trace_setup(base)
        if untied:
            self.trace.append(("f", self._trace_new(untied)))
        self.trace_setup(quant_state_tensors)
        self.trace_setup(adapters)

    def begin_trace(self, options: dict | None) -> None:
        """`record_trace` from a backend's trace options ({"workspaces", "workspaces_before_setup",
        "sdpa_backend"}: planner.backends.allocation.trace_options); None: no trace."""
        if options is None:
            return
        from planner.backends.dryrun.kernel_workspaces import kernel_workspaces_for

        self.record_trace(options.get("workspaces"), before_setup=options.get("workspaces_before_setup", False),
                          kernel_workspaces=kernel_workspaces_for(options))

    def _trace_new(self, nbytes: int) -> int:
        """An allocation event with a fresh id (returned)."""
        self._trace_ids += 1
        self.trace.append(("a", self._trace_ids, nbytes, 0))
        return self._trace_ids

    def _trace_alloc(self, winfo, nbytes: int) -> None:
        winfo.trace_id = self._trace_new(nbytes)

    def start_trace_program(self) -> None:
        """From now on every counted storage enters the trace as it is made."""
        self._trace_setup_done = True

    def trace_reset(self) -> None:
        """`torch.cuda.reset_peak_memory_stats()` after the set-up: the measured program starts."""
        if self.trace is None:
            return
        self.start_trace_program()
        self.trace += [("phase", "reset"), ("reset",)]

    def trace_event(self, *event) -> None:
        if self.trace is not None:
            self.trace.append(tuple(event))

    def trace_setup(self, tensors) -> None:
        """Setup allocations (model, adapters, states) in the order given: the order the real
        program allocated them, which `track_model`'s parameters-then-buffers walk need not be."""
        if self.trace is None:
            return
        seen = set()
        for t in tensors:
            for st in get_untyped_storages(t):
                winfo, _ = self._WINFO.get(st, (None, None))
                if winfo is None or getattr(winfo, "excluded", False) or id(winfo) in seen:
                    continue
                seen.add(id(winfo))
                if getattr(winfo, "trace_id", None) is None:
                    self._trace_alloc(winfo, winfo.size * winfo.element_size)

    def _maybe_workspace(self, func) -> None:
        thread = "backward" if self._mod_tracker.is_bw else "forward"
        if thread in self._workspaces_made or func not in _CUBLAS_OPS or self._in_opt:
            return
        self._workspaces_made.add(thread)
        size = self.workspaces.get(thread, 0)
        if size:
            self._trace_new(size)

    def _note_accumulation(self, args, kwargs, res) -> None:
        """A gradient accumulation of autograd's InputBuffer (torch/csrc/autograd/input_buffer.cpp,
        `accumulate`): on a GPU without dispatch modes it adds in place into the old buffer when
        that is the last reference to a dense tensor (`can_accumulate_inplace`), else into the new
        gradient; under any dispatch mode (this tracker, FakeTensorMode) `isTensorSubclassLike` is
        true and it adds out of place. When the tensor it would have written into is freed right
        after the add, the trace is rewritten as the GPU runs it: no new block, the result lives
        in that tensor's block."""
        if kwargs and kwargs.get("alpha", 1) != 1 or len(args) < 2:
            return
        old, var = args[0], args[1]
        if not (isinstance(old, torch.Tensor) and isinstance(var, torch.Tensor) and isinstance(res, torch.Tensor)):
            return
        if old.shape != var.shape or old.dtype != var.dtype or res.shape != old.shape:
            return
        from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

        into = old if is_non_overlapping_and_dense(old) else var if is_non_overlapping_and_dense(var) else None
        if into is None or self.trace is None or not self.trace or self.trace[-1][0] != "a":
            return
        st_into = get_untyped_storages(into)
        st_res = get_untyped_storages(res)
        if len(st_into) != 1 or len(st_res) != 1:
            return
        w_into, _ = self._WINFO.get(next(iter(st_into)), (None, None))
        w_res, _ = self._WINFO.get(next(iter(st_res)), (None, None))
        if w_into is None or w_res is None or getattr(w_into, "trace_id", None) is None:
            return
        if self.trace[-1][1] != getattr(w_res, "trace_id", None):
            return
        if w_into.size * w_into.element_size != w_res.size * w_res.element_size:
            return
        self._accumulation = (len(self.trace) - 1, w_res, w_into.trace_id)

    def _accumulated_in_place(self, winfo) -> bool:
        """The free of the tensor an accumulation would have written into, right after it (only
        frees in between): drop the add's block and keep the result in that tensor's block."""
        acc = self._accumulation
        if acc is None:
            return False
        index, w_res, into_id = acc
        if getattr(winfo, "trace_id", None) != into_id:
            if any(e[0] != "f" for e in self.trace[index + 1:]):
                self._accumulation = None
            return False
        self._accumulation = None
        if index >= len(self.trace) or any(e[0] != "f" for e in self.trace[index + 1:]):
            return False
        del self.trace[index]
        w_res.trace_id = into_id
        self.accumulations_in_place += 1
        return True

    # ---- accounting -----------------------------------------------------------------------
    def _rounded(self, nbytes: int) -> int:
        r = self.round_bytes
        if r <= 1 or nbytes == 0:
            return nbytes
        return -(-nbytes // r) * r

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        if getattr(winfo, "excluded", False):
            return
        if u_type == _UpdateType.ADD:
            if not hasattr(winfo, "detail"):
                winfo.detail = self._pending_detail
            winfo.mem_consumed = self._rounded(winfo.size * winfo.element_size)
            if self._pending_alias:
                winfo.excluded = True  # a view of memory the tracker did not see allocated
                return
            if self.alloc_exclude is not None:
                winfo.excluded = True
                self.outside[self.alloc_exclude] += winfo.mem_consumed
                return
        elif u_type == _UpdateType.SIZE:
            winfo.mem_consumed = self._rounded(winfo.size * winfo.element_size)
        super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)
        if self.trace is not None and self._trace_setup_done:
            if u_type == _UpdateType.ADD:
                self._trace_alloc(winfo, winfo.size * winfo.element_size)
            elif u_type == _UpdateType.DEL:
                tid = getattr(winfo, "trace_id", None)
                if tid is not None and not self._accumulated_in_place(winfo):
                    self.trace.append(("f", tid))
            elif u_type == _UpdateType.SIZE:  # resize_: a new block, then the old one freed
                old = getattr(winfo, "trace_id", None)
                self._trace_alloc(winfo, winfo.size * winfo.element_size)
                if old is not None:
                    self.trace.append(("f", old))
        d = getattr(winfo, "detail", None)
        if u_type == _UpdateType.ADD:
            if not hasattr(winfo, "origin"):
                winfo.origin = self._origin()
            o = winfo.origin
            self.total += winfo.mem_consumed
            self.origin_totals[(o, _okey(d, winfo.reftype))] += winfo.mem_consumed
            if d:
                self.detail_totals[(d, winfo.reftype)] += winfo.mem_consumed
        elif u_type == _UpdateType.DEL:
            self.total -= winfo.mem_consumed
            self.origin_totals[(winfo.origin, _okey(d, winfo.reftype))] -= winfo.mem_consumed
            if d:
                self.detail_totals[(d, winfo.reftype)] -= winfo.mem_consumed
        elif u_type == _UpdateType.REF:
            self.origin_totals[(winfo.origin, _okey(d, old_reftype))] -= winfo.mem_consumed
            self.origin_totals[(winfo.origin, _okey(d, winfo.reftype))] += winfo.mem_consumed
            if d:
                self.detail_totals[(d, old_reftype)] -= winfo.mem_consumed
                self.detail_totals[(d, winfo.reftype)] += winfo.mem_consumed
        elif u_type == _UpdateType.SIZE:
            change = winfo.mem_consumed - old_mem_consumed
            self.total += change
            self.origin_totals[(winfo.origin, _okey(d, winfo.reftype))] += change
            if d:
                self.detail_totals[(d, winfo.reftype)] += change

    def _origin(self) -> str:
        """Where a storage is made: '<module>:<op>', layer indices folded (layers.*)."""
        func = self._cur_func
        op = "-" if func is None else self._op_names.get(func)
        if op is None:
            op = str(func).removeprefix("aten.").removesuffix(".default")
            self._op_names[func] = op
        if func is None:
            where = self.origin_context or "(setup)"
        elif self._in_opt:
            where = "(optimizer.step)"
        else:
            parents = self._mod_tracker.parents
            inner = max(parents, key=lambda n: n.count(".")) if parents else "Global"
            where = self._mod_names.get(inner)
            if where is None:
                where = _fold_module_name(inner)
                self._mod_names[inner] = where
            if self._mod_tracker.is_bw:
                where = f"{where} [bw]" if not self._in_ac else f"{where} [recompute]"
        return f"{where}:{op}"

    def _winfos(self, t: torch.Tensor, reftype=_MemRefType.OTH):
        return self._update_and_maybe_create_winfos(t, reftype)

    def set_detail(self, tensors, detail: str | None) -> None:
        """Attribute the storages of `tensors` to a detail (moving their bytes between details)."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            for st in get_untyped_storages(t):
                winfo, _ = self._WINFO.get(st, (None, None))
                if winfo is None:
                    self._pending_detail = detail
                    self._winfos(t)
                    self._pending_detail = None
                    continue
                old = getattr(winfo, "detail", None)
                if old == detail or getattr(winfo, "excluded", False):
                    continue
                if old:
                    self.detail_totals[(old, winfo.reftype)] -= winfo.mem_consumed
                if detail:
                    self.detail_totals[(detail, winfo.reftype)] += winfo.mem_consumed
                o = getattr(winfo, "origin", None)
                if o is not None:
                    self.origin_totals[(o, _okey(old, winfo.reftype))] -= winfo.mem_consumed
                    self.origin_totals[(o, _okey(detail, winfo.reftype))] += winfo.mem_consumed
                winfo.detail = detail

    def track_tensors(self, tensors, reftype=_MemRefType.OTH, detail: str | None = None) -> None:
        for t in tensors:
            self._pending_detail = detail
            self._winfos(t, reftype)
            self._pending_detail = None
        self._check_peak(None)

    # ---- hooks ---------------------------------------------------------------------------
    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        def _grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        param_memory = 0
        for param in module.parameters():
            winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
            param_memory += sum(w.mem_consumed for w in winfos)
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                h1 = param.register_hook(_grad_hook)
                h2 = param.register_post_accumulate_grad_hook(lambda p: _grad_hook(p.grad))
                self._param_to_grad_hook_handles[param] = (h1, h2)
        buffer_memory = 0
        for buffer in module.buffers():
            winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
            buffer_memory += sum(w.mem_consumed for w in winfos)
        return param_memory, buffer_memory

    # Module hooks: MemTracker's keep per-module snapshots (deep copies at every module call),
    # which the dry run does not use; only the activation-checkpointing bookkeeping is kept
    # (tensors made while recomputing a checkpointed module in backward are activations).
    # Parameters, buffers and grad hooks are registered once, by `track_model`.
    def _pre_fw_hook(self, module, inputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is None:
            import weakref

            self._ac_mod = weakref.ref(module)
            self._in_ac = True

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        if self._mod_tracker.is_bw and self._ac_mod is not None and self._ac_mod() is module:
            self._ac_mod = None
            self._in_ac = False

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    def track_model(self, model) -> None:
        """Parameters and buffers (allocated before the program), grad hooks on trainable ones."""
        self._track_module_params_and_buffers(model, install_grad_hooks=True)
        self._check_peak(None)

    def _track(self, reftype, t: torch.Tensor) -> None:
        detail = self.alloc_detail
        if detail is None and self.classifier is not None and self._cur_func is not None:
            detail = self.classifier(self._cur_func, self._cur_args, t)
        self._pending_detail = detail
        try:
            super()._track(reftype, t)
        finally:
            self._pending_detail = None

    def _update_peak_stats(self, peak_state) -> None:  # module-level stats are not used
        pass

    def _check_peak(self, func) -> None:
        tot = self.total
        ph = self.phase
        if tot > self.phase_peaks.get(ph, -1):
            self.phase_peaks[ph] = tot
        if tot > self.peak_total:
            self.peak_total = tot
            cats: dict[Any, int] = defaultdict(int)
            for dev_snap in self._curr_mem_snap.values():
                for k, v in dev_snap.items():
                    if k != _TOTAL_KEY:
                        cats[k] += v
            self.peak_categories = dict(cats)
            self._peak_mem_snap = deepcopy(self._curr_mem_snap)
            self._peak_mem = {dev: s[_TOTAL_KEY] for dev, s in self._curr_mem_snap.items()}
            self.peak_details = {k: v for k, v in self.detail_totals.items() if v}
            self.peak_origins = {k: v for k, v in self.origin_totals.items() if v}
            self.peak_phase = ph
            self.peak_step = self.step
            self.peak_op = str(func) if func is not None else ""
            self.peak_extra = self.at_peak() if self.at_peak is not None else {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and self.oracle is not None:
            from torch._subclasses.fake_tensor import FakeTensor

            if isinstance(args[0], FakeTensor):
                return self.oracle.answer(args[0])
        res = func(*args, **(kwargs or {}))
        self.op_count += 1
        if self._in_opt:
            reftype = _MemRefType.OPT
        elif self._mod_tracker.is_bw and not self._in_ac:
            reftype = _MemRefType.TEMP
        else:
            reftype = _MemRefType.ACT
        self._cur_func, self._cur_args = func, args
        aliasing = self._alias_ops.get(func)
        if aliasing is None:
            schema = getattr(func, "_schema", None)
            aliasing = bool(schema) and any(r.alias_info is not None for r in schema.returns)
            if func is torch.ops.aten.lift_fresh.default:  # torch.tensor(data): a fresh tensor
                aliasing = False
            self._alias_ops[func] = aliasing
        # Outputs of view/in-place ops never allocate. An unseen storage there is memory made
        # outside the tracker: under FakeTensorMode, the fake copy of a real input tensor (the
        # never-written CPU tensors behind bitsandbytes' packed weights and quantization states).
        self._pending_alias = aliasing
        # `torch.tensor(0.0)` inside optimizer.step: AdamW's per-parameter step counters, which
        # (foreach / for-loop, not fused / capturable) live on the host in a CUDA run
        host = self._in_opt and func is torch.ops.aten.lift_fresh.default and self.alloc_exclude is None
        if host:
            self.alloc_exclude = "host_step_counters"
        try:
            tree_map_only(torch.Tensor, partial(self._track, reftype), res)
            if self.trace is not None:
                if self.workspaces:
                    self._maybe_workspace(func)
                if self.kernel_workspaces is not None and self._trace_setup_done:
                    ids = [self._trace_new(size) for size in self.kernel_workspaces(func, args)]
                    self.trace.extend(("f", i) for i in reversed(ids))
                if func is torch.ops.aten.add.Tensor and self._mod_tracker.is_bw and not torch.is_grad_enabled():
                    self._note_accumulation(args, kwargs, res)
        finally:
            self._cur_func, self._cur_args = None, ()
            self._pending_alias = False
            if host:
                self.alloc_exclude = None
        self._check_peak(func)
        return res

    # ---- results -------------------------------------------------------------------------
    def peak_breakdown(self) -> tuple[dict[str, int], dict[str, int]]:
        """(categories, details) at the global peak; kv_cache moved out of its MemTracker category."""
        cats = {name: 0 for name in CATEGORY_OF.values()}
        cats["kv_cache"] = 0
        for k, v in self.peak_categories.items():
            cats[CATEGORY_OF[k]] += v
        details: dict[str, int] = defaultdict(int)
        for (d, reftype), v in self.peak_details.items():
            details[d] += v
            if d == "kv_cache":
                cats[CATEGORY_OF[reftype]] -= v
                cats["kv_cache"] += v
        return cats, dict(details)

    def peak_origin_breakdown(self, top: int = 60) -> dict[str, int]:
        """Bytes at the peak by '<category> <module>:<op>' that made them, largest first."""
        out: dict[str, int] = defaultdict(int)
        for (origin, reftype), v in self.peak_origins.items():
            out[f"{CATEGORY_OF.get(reftype, reftype)} {origin}"] += v
        items = sorted(out.items(), key=lambda kv: -kv[1])
        res = dict(items[:top])
        rest = sum(v for _, v in items[top:])
        if rest:
            res["(rest)"] = rest
        return res
