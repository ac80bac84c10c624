"""torch side of planner.backends.fakepg: fake process group, FSDP2 / TP set-up, trackers (imports
torch; loaded lazily by `dry_run_distributed`)."""

from __future__ import annotations

import contextlib
import gc
import time
from collections import defaultdict
from typing import Any
import torch
import torch.distributed as dist
from torch import nn
from torch._guards import active_fake_mode
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _UpdateType
from torch.distributed.tensor import DTensor

from planner.backends.dryrun import _patches
from planner.backends.dryrun._build import DTYPES, build_meta, materialize
from planner.backends.dryrun._programs import make_optimizer, optimizer_state_tensors, run_sft
from planner.backends.dryrun._run import _classifier, _versions
from planner.backends.dryrun._tracker import DryRunTracker, _AnyModeModTracker
from planner.backends.fakepg.result import CATEGORIES, FSDP_CATEGORY, FSDP_DETAIL, DistributedDryRunResult
from planner.engine.distributed.layout import Layout, LayoutError

_WAIT = torch.ops._c10d_functional.wait_tensor.default


# ---- process group and meshes ---------------------------------------------------------------------
@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0):
    """`dist.init_process_group(backend="fake")` for the duration (destroyed after)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process; the distributed dry run "
                           "creates its own fake one")
    dist.init_process_group(backend="fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def make_mesh(dp: int, tp: int):
    """(dp mesh or None, tp mesh or None), created outside any FakeTensorMode."""
    from torch.distributed.device_mesh import init_device_mesh

    with _no_fake():
        if dp > 1 and tp > 1:
            mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
            return mesh["dp"], mesh["tp"]
        mesh = init_device_mesh("cpu", (dp * tp,), mesh_dim_names=("dp" if tp == 1 else "tp",))
        return (mesh, None) if tp == 1 else (None, mesh)


@contextlib.contextmanager
def _no_fake():
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


# ---- the model's parallelisation ------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise LayoutError(f"model: cannot find the decoder layers of {type(base).__name__} (expected .model.layers)")
    return list(layers)


def tensor_parallel(model: nn.Module, tp_mesh, vocab: str) -> None:
    """Megatron's split of each decoder layer; the vocabulary sharded too with vocab="parallel"."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    layer_plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, layer_plan)
    if vocab == "parallel":
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if head is not None and head.weight is emb.weight:
            raise LayoutError("vocab: tied embeddings cannot be vocab-parallel here; use vocab='replicated'")
        parallelize_module(emb, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
        parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    replicate_rest(model, tp_mesh)


def replicate_rest(model: nn.Module, tp_mesh) -> None:
    """Parameters TP leaves whole (norms; with vocab="replicated" the embedding and lm_head) become
    Replicate DTensors, their modules taking and returning plain tensors (from_local / to_local are
    views: no memory). As in torchtitan, every parameter is then a DTensor on the TP mesh, so a foreach
    optimizer runs one group (a plain tensor and a DTensor cannot share a foreach call)."""
    from torch.distributed.tensor import Replicate, distribute_module

    def inputs(_mod, args, mesh):
        return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                     if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

    def outputs(_mod, out, _mesh):
        return out.to_local() if isinstance(out, DTensor) else out

    for mod in list(model.modules()):
        own = [p for p in mod.parameters(recurse=False)]
        if own and not all(isinstance(p, DTensor) for p in own):
            distribute_module(mod, tp_mesh, input_fn=inputs, output_fn=outputs)


def mixed_precision_policy(plan):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if plan.precision.startswith("mixed"):
        return MixedPrecisionPolicy(param_dtype=DTYPES[plan.compute_dtype], reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: nn.Module, dp_mesh, plan, layout: Layout) -> None:
    """FSDP2: every decoder layer, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(plan)
    reshard = layout.fsdp == "full-shard"
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)


# ---- trackers -------------------------------------------------------------------------------------
class _SkipPropagation:
    """DTensor's sharding propagation runs ops on global-shaped fake tensors under the ambient fake
    mode; count none of them."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.orig = None

    def __enter__(self):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        self.orig = orig = ShardingPropagator._propagate_tensor_meta_non_cached
        tracker = self.tracker

        def propagate(prop_self, op_schema):
            tracker._skip += 1
            try:
                return orig(prop_self, op_schema)
            finally:
                tracker._skip -= 1

        ShardingPropagator._propagate_tensor_meta_non_cached = propagate
        return self

    def __exit__(self, *exc):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        ShardingPropagator._propagate_tensor_meta_non_cached = self.orig
        ShardingPropagator._propagate_tensor_meta_cached.cache_clear()


class _DistMixin:
    """DTensor ops are left to DTensor (the tracker sees its local ops); ops of sharding propagation
    are not tracked; wait_tensor returns its input as on a GPU. Adds the "loss backward" phase (from
    `.backward()` until the gradient reaches the last decoder layer), the category snapshot at each
    phase's peak, and the module running at the peak."""

    _skip = 0
    _phase = "setup"
    _cur_op = None
    peak_module = ""

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase = "loss backward" if value == "backward" else value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(t, type) and issubclass(t, DTensor) for t in types):
            return NotImplemented
        if self._skip:
            return func(*args, **(kwargs or {}))
        if func is _WAIT and active_fake_mode() is not None:
            return args[0]
        self._cur_op = func
        return super().__torch_dispatch__(func, types, args, kwargs)

    def categories_now(self) -> dict[str, int]:
        """Raw tracker categories now (names as the tracker's enums spell them)."""
        cats: dict[str, int] = defaultdict(int)
        for snap in self._curr_mem_snap.values():
            for k, v in snap.items():
                if k != _TOTAL_KEY:
                    cats[getattr(k, "value", str(k))] += v
        return dict(cats)

    def note_phase(self, total: int, opt_state) -> None:
        """Call after each op: keeps the categories at each phase's peak, and the module at the peak."""
        snaps = self.__dict__.setdefault("phase_snapshots", {})
        prev = snaps.get(self._phase)
        if prev is None or total > prev[0]:
            snaps[self._phase] = (total, self.categories_now(), opt_state() if self._in_opt else None)

    def current_module(self) -> str:
        parents = self._mod_tracker.parents
        inner = max(parents, key=lambda n: (n.count("."), n)) if parents else "Global"
        return inner + (" [bw]" if self._mod_tracker.is_bw else "")


class FSDPDryRunTracker(_DistMixin, FSDPMemTracker):
    """FSDPMemTracker with 512-byte rounding, "any"-mode module hooks, the phase and op of the global
    peak, and no per-module snapshots."""

    def __init__(self, mod: nn.Module, optm, round_bytes: int = 512) -> None:
        super().__init__(mod, optm)
        self._mod_tracker = _AnyModeModTracker()
        self.round_bytes = round_bytes
        self.step = -1
        self.phase_peaks: dict[str, int] = {}
        self.peak_total = 0
        self.peak_categories: dict[str, int] = {}
        self.peak_phase = "setup"
        self.peak_step = -1
        self.peak_op = ""
        self.peak_opt_state: int | None = None

    @property
    def total(self) -> int:
        return sum(s.get(_TOTAL_KEY, 0) for s in self._curr_mem_snap.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # `torch.tensor(0.)` in optimizer.step: AdamW's per-parameter step counters, which the foreach
        # (not fused / capturable) AdamW keeps on the host in a CUDA run (as planner.backends.dryrun excludes them)
        if self._in_opt and func is torch.ops.aten.lift_fresh.default:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    # the FSDP unit whose pre-forward / pre-backward ran last (ModTracker's parents in backward are loose)
    def _fsdp_state_pre_forward(self, fsdp_mod, orig):
        inner = super()._fsdp_state_pre_forward(fsdp_mod, orig)

        def pre_forward(*args, **kwargs):
            self._unit = (self._mod_tracker.get_known_fqn(fsdp_mod) or type(fsdp_mod).__name__) + \
                (" [recompute]" if self._mod_tracker.is_bw else "")
            return inner(*args, **kwargs)

        return pre_forward

    def _fsdp_param_group_pre_backward(self, fsdp_mod, orig):
        inner = super()._fsdp_param_group_pre_backward(fsdp_mod, orig)

        def pre_backward(*args, **kwargs):
            self._unit = (self._mod_tracker.get_known_fqn(fsdp_mod) or type(fsdp_mod).__name__) + " [bw]"
            return inner(*args, **kwargs)

        return pre_backward

    def current_module(self) -> str:
        return "FSDP unit " + getattr(self, "_unit", "-")

    def _track_optimizer_states(self, reftype, optimizer) -> None:
        for states in optimizer.state.values():
            for key, val in states.items():
                if isinstance(val, torch.Tensor) and not (key == "step" and val.dim() == 0):
                    self._update_and_maybe_create_winfos(val, reftype)

    def _update_snap(self, u_type, winfo, old_mem_consumed=None, old_reftype=None) -> None:
        if u_type in (_UpdateType.ADD, _UpdateType.SIZE):
            n, r = winfo.size * winfo.element_size, self.round_bytes
            winfo.mem_consumed = -(-n // r) * r if r > 1 and n else n
        super()._update_snap(u_type, winfo, old_mem_consumed=old_mem_consumed, old_reftype=old_reftype)

    def _update_peak_stats(self, peak_state) -> None:  # global peak only
        self.check_peak()

    def opt_state_bytes(self) -> int:
        return self.storage_bytes(optimizer_state_tensors(self._optm))

    def check_peak(self) -> None:
        tot = self.total
        if tot > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = tot
            self.note_phase(tot, self.opt_state_bytes)
        if tot > self.peak_total:
            self.peak_total = tot
            self.peak_categories = self.categories_now()
            self.peak_phase, self.peak_step = self.phase, self.step
            self.peak_op = str(self._cur_op) if self._cur_op is not None else ""
            self.peak_module = self.current_module()
            self.peak_opt_state = self.opt_state_bytes() if self._in_opt else None

    def storage_bytes(self, tensors) -> int:
        seen, total = set(), 0
        for t in tensors:
            for st in get_untyped_storages(t):
                winfo, _ = self._WINFO.get(st, (None, None))
                if winfo is not None and id(st) not in seen:
                    seen.add(id(st))
                    total += winfo.mem_consumed
        return total


class TPDryRunTracker(_DistMixin, DryRunTracker):
    """planner.backends.dryrun's tracker for DTensor programs without FSDP."""

    opt = None

    def opt_state_bytes(self) -> int:
        from planner.backends.dryrun._run import _storage_bytes

        return _storage_bytes(self, optimizer_state_tensors(self.opt)) if self.opt is not None else 0

    def _check_peak(self, func) -> None:
        new_phase_peak = self.total > self.phase_peaks.get(self.phase, -1)
        new_peak = self.total > self.peak_total
        super()._check_peak(func)
        if new_phase_peak:
            self.note_phase(self.total, self.opt_state_bytes)
        if new_peak:
            self.peak_module = self.current_module()


# ---- the run --------------------------------------------------------------------------------------
def param_groups(params: list[torch.Tensor]) -> list[dict]:
    """One group per kind (plain tensors, DTensors of one mesh): a foreach optimizer cannot mix them.
    After `replicate_rest` (TP) or FSDP alone there is one."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        key = p.device_mesh.mesh_dim_names if isinstance(p, DTensor) else None
        groups.setdefault(key, []).append(p)
    return [{"params": ps} for ps in groups.values()]


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def run(plan, layout: Layout, config: dict, *, steps: int, round_bytes: int, vocab: str,
        device: str) -> DistributedDryRunResult:
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    dp, tp = layout.dp, layout.tp
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    if heads % tp or kv % tp or int(config["intermediate_size"]) % tp:
        raise LayoutError(f"tp: {tp} must divide the {heads} heads, {kv} KV heads and MLP width "
                          f"{config['intermediate_size']}")
    fsdp = layout.fsdp is not None
    run_plan = plan.model_copy(update={"grad_accum": layout.grad_accum})
    notes: list[str] = []
    autocast_on = plan.autocast and not fsdp  # FSDP: MixedPrecisionPolicy casts the parameters instead
    mp_text = ""
    if fsdp:
        mp = mixed_precision_policy(plan)
        mp_text = f"param_dtype={mp.param_dtype}, reduce_dtype={mp.reduce_dtype}" if mp.param_dtype else "none"
    vocab_size = int(config["vocab_size"])
    vocab_local = vocab_size // tp if (tp > 1 and vocab == "parallel") else vocab_size
    gc.collect()

    def autocast():
        if autocast_on:
            return torch.autocast("cpu", dtype=DTYPES[plan.compute_dtype])
        return contextlib.nullcontext()

    with fake_process_group(layout.gpus):
        dp_mesh, tp_mesh = make_mesh(dp, tp)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patches.transformers_not_tracing(answer_reads=True))
            stack.enter_context(_patches.autocast_query_means_cpu())
            stack.enter_context(_patches.cuda_autocast_policy())
            model, build_notes = build_meta(plan, config)
            notes += build_notes
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if device == "fake" else None
            built = materialize(model, fake_mode)
            model = built.model
            with fake_mode if fake_mode is not None else contextlib.nullcontext():
                if tp > 1:
                    tensor_parallel(model, tp_mesh, vocab)
                    notes.append("TP: q,k,v,gate,up ColwiseParallel; o,down RowwiseParallel"
                                 + ("; embedding RowwiseParallel, lm_head ColwiseParallel (vocab-sharded logits, "
                                    "loss_parallel)" if vocab == "parallel" else "; embedding and lm_head replicated"))
                if fsdp:
                    with _no_fake():  # DeviceMesh reads its coordinates (nonzero) on real tensors
                        shard(model, dp_mesh, plan, layout)
                    notes.append(f"FSDP2 fully_shard per decoder layer + root, reshard_after_forward="
                                 f"{layout.fsdp == 'full-shard'}, MixedPrecisionPolicy({mp_text})")
            trainable = [p for p in model.parameters() if p.requires_grad]
            local = {
                "rank_params": sum(_local_numel(p) for p in model.parameters()),
                "rank_param_bytes": sum(_local_numel(p) * p.element_size() for p in model.parameters()),
            }
            if fake_mode is not None:
                stack.enter_context(fake_mode)
            groups = param_groups(trainable)
            if len(groups) > 1:
                notes.append(f"optimizer: {len(groups)} parameter groups (foreach cannot mix plain tensors and "
                             "DTensors, or DTensors on different meshes)")
            opt, opt_notes = make_optimizer(run_plan, groups if len(groups) > 1 else trainable, None)
            notes += opt_notes
            if fsdp:
                tracker = FSDPDryRunTracker(model, opt, round_bytes)
            else:
                tracker = TPDryRunTracker(round_bytes=round_bytes)
                tracker.classifier = _classifier_for(vocab_size, vocab_local)
            stack.enter_context(_SkipPropagation(tracker))
            stack.enter_context(tracker)
            if tp > 1 and vocab == "parallel":
                from torch.distributed.tensor.parallel import loss_parallel

                stack.enter_context(loss_parallel())
            if fsdp:
                # FSDPMemTracker refuses a second root forward without a reset of its module stats
                stack.callback(model.register_forward_pre_hook(lambda *_: tracker.reset_mod_stats(),
                                                               prepend=True).remove)
            else:
                tracker.track_model(model)

                def at_peak() -> dict[str, int]:
                    if tracker.phase != "optimizer":
                        return {}
                    from planner.backends.dryrun._run import _storage_bytes

                    return {"optimizer_state_bytes": _storage_bytes(tracker, optimizer_state_tensors(opt))}

                tracker.at_peak = at_peak
                tracker.opt = opt
            last = decoder_layers(model)[-1]
            stack.callback(last.register_forward_hook(_end_of_loss_backward(tracker)).remove)
            baseline = tracker.total
            tracker.peak_total = 0
            tracker.phase_peaks = {}
            tracker.__dict__["phase_snapshots"] = {}
            step_end = run_sft(run_plan, model, opt, tracker, vocab_size, steps, autocast)

    if fsdp:
        breakdown, details = _fsdp_breakdown(tracker)
    else:
        breakdown, details = _tp_breakdown(tracker)
    assert sum(breakdown.values()) == tracker.peak_total, (breakdown, tracker.peak_total)
    phase_breakdowns = phase_category_breakdowns(tracker)
    phases = {k: v for k, v in tracker.phase_peaks.items() if k not in ("setup", "between_steps")}
    versions = _versions()
    versions["process_group"] = "fake"
    return DistributedDryRunResult(
        layout=layout.model_dump(), world_size=layout.gpus, rank=0, mesh={"dp": dp, "tp": tp}, vocab=vocab,
        mixed_precision_policy=mp_text, peak_allocated_bytes=tracker.peak_total, breakdown=breakdown,
        details={k: v for k, v in details.items() if v}, peak_phase=tracker.peak_phase,
        peak_step=max(tracker.peak_step, 0), peak_op=tracker.peak_op, peak_module=tracker.peak_module,
        phases=phases, phase_breakdowns=phase_breakdowns, step_end_bytes=step_end,
        params={**built.counts, **local, "baseline_bytes": baseline}, wall_s=round(time.perf_counter() - t0, 3),
        device=device, versions=versions, notes=notes,
    )


def _classifier_for(vocab: int, vocab_local: int):
    full = _classifier(vocab)
    part = _classifier(vocab_local)

    def classify(func, args, t):
        return full(func, args, t) or part(func, args, t)

    return classify


RAW_CATEGORY = {**FSDP_CATEGORY, "Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer_states",
                "Other": "other"}


def phase_category_breakdowns(tracker) -> dict[str, dict[str, int]]:
    """Each step phase's peak snapshot in categories (and its details as 'detail:<name>')."""
    out = {}
    for ph, (tot, raw, opt_state) in tracker.phase_snapshots.items():
        if ph in ("setup", "between_steps"):
            continue
        cats, det = to_categories(raw, opt_state)
        assert sum(cats.values()) == tot, (ph, cats, tot)
        out[ph] = {**cats, **{f"detail:{k}": v for k, v in det.items() if v}}
    return out


def to_categories(raw: dict[str, int], opt_state: int | None) -> tuple[dict[str, int], dict[str, int]]:
    """Tracker categories -> the estimator's (CATEGORIES) and FSDP's own (details). `opt_state`: bytes
    of the optimizer's state tensors when inside optimizer.step (the rest of what was made there is
    temporaries)."""
    cats = {k: 0 for k in CATEGORIES}
    details: dict[str, int] = {}
    for name, v in raw.items():
        cats[RAW_CATEGORY.get(name, "other")] += v
        if name in FSDP_DETAIL:
            details[FSDP_DETAIL[name]] = v
    if opt_state is not None:
        in_opt = cats["optimizer_states"]
        cats["optimizer_states"] = opt_state
        cats["temporaries"] += in_opt - opt_state
        details["optimizer_temporaries"] = in_opt - opt_state
    if any(k in details for k in FSDP_DETAIL.values()):
        details["gathered"] = sum(details.get(k, 0) for k in ("unsharded_params", "all_gather_buffers",
                                                               "unsharded_grads", "reduce_scatter_buffers"))
    return cats, details


def _fsdp_breakdown(tracker: FSDPDryRunTracker) -> tuple[dict[str, int], dict[str, int]]:
    return to_categories(tracker.peak_categories, tracker.peak_opt_state)


def _tp_breakdown(tracker: TPDryRunTracker) -> tuple[dict[str, int], dict[str, int]]:
    cats, details = tracker.peak_breakdown()
    cats.pop("kv_cache", None)
    extra = tracker.peak_extra
    if "optimizer_state_bytes" in extra:
        in_opt = cats["optimizer_states"]
        cats["optimizer_states"] = extra["optimizer_state_bytes"]
        cats["temporaries"] += in_opt - extra["optimizer_state_bytes"]
        details["optimizer_temporaries"] = in_opt - extra["optimizer_state_bytes"]
    return {k: cats.get(k, 0) for k in CATEGORIES}, dict(details)


def _end_of_loss_backward(tracker):
    """Forward hook on the last decoder layer: when the gradient reaches its output, the loss's
    backward (loss, lm_head, final norm) is over and the layers' backward begins."""

    def to_backward(_grad):
        if tracker.phase == "loss backward":
            tracker._phase = "backward"

    def hook(_mod, _inp, out):
        t = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(t, torch.Tensor) and t.requires_grad and not tracker._mod_tracker.is_bw:
            t.register_hook(to_backward)

    return hook
