"""Context managers that make a CPU replay allocate what the CUDA program allocates.

Each one answers a question the GPU run answers differently from a CPU/fake-tensor run, and is
active only for the duration of a dry run (everything is restored on exit).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_map_only


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# -------------------------------------------------------------------------------------------
# 1. transformers: a FakeTensor is not "tracing" (measuring.md item 2)
# -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def transformers_not_tracing(answer_reads: bool = True) -> Iterator[None]:
    """Give transformers' mask code the answers a GPU run computes.

    transformers.masking_utils treats a FakeTensor as tracing: it would materialise a
    (B,1,S,S) mask, and SDPA would then use repeat_kv instead of `enable_gqa`. Here:
    - `is_tracing(t)` ignores fakeness (still true under dynamo/jit);
    - `fast_all(mask)` on a fake mask runs its ops (sum, ==) and answers True: the replayed
      programs only pass all-ones masks;
    - `find_packed_sequence_indices` on fake position ids runs its ops and answers None: the
      replayed programs use plain aranges, never packed sequences.
    """
    from transformers import masking_utils as mu
    from transformers.utils import import_utils as iu

    orig_is_tracing = mu.is_tracing
    orig_fast_all = mu.fast_all
    orig_find_packed = mu.find_packed_sequence_indices

    def is_tracing(tensor=None) -> bool:
        return iu.is_tracing(None if _is_fake(tensor) else tensor)

    def fast_all(tensor):
        out = orig_fast_all(tensor)
        return True if _is_fake(out) else out

    def find_packed_sequence_indices(position_ids):
        if not _is_fake(position_ids):
            return orig_find_packed(position_ids)
        first_dummy_value = position_ids[:, :1] - 1
        position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
        packed_sequence_mask = (position_diff != 1).cumsum(-1)
        _ = (packed_sequence_mask[:, -1] == 0).all()
        return None

    mu.is_tracing = is_tracing
    if answer_reads:
        mu.fast_all = fast_all
        mu.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        mu.is_tracing = orig_is_tracing
        mu.fast_all = orig_fast_all
        mu.find_packed_sequence_indices = orig_find_packed


# -------------------------------------------------------------------------------------------
# 2. torch.is_autocast_enabled() with no argument means CUDA (measuring.md item 4)
# -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def autocast_query_means_cpu() -> Iterator[None]:
    """peft asks `torch.is_autocast_enabled()` (no device = CUDA) to decide whether to cast the
    LoRA input to the adapter dtype. On the GPU that is the autocast state of the run; here the
    run's autocast is the CPU one, so answer with it."""
    orig = torch.is_autocast_enabled

    @functools.wraps(orig)
    def is_autocast_enabled(*args, **kwargs):
        if not args and not kwargs:
            return orig("cpu")
        return orig(*args, **kwargs)

    torch.is_autocast_enabled = is_autocast_enabled
    try:
        yield
    finally:
        torch.is_autocast_enabled = orig


# -------------------------------------------------------------------------------------------
# 3. CUDA's autocast op lists, replayed under CPU autocast (measuring.md item 4)
# -------------------------------------------------------------------------------------------
# CUDA autocast policies (aten/src/ATen/autocast_mode.h, AT_FORALL_* lists) for the ops that
# have an AutocastCUDA kernel but none for AutocastCPU in this torch build (the others, e.g.
# mm/linear/bmm/matmul/sdpa (lower precision) and nll_loss/mse_loss/... (fp32), already have
# the same policy on both). `cuda_only_autocast_ops()` lists the ops this covers.
CUDA_LOWER_PRECISION = (
    "_convolution",
    "convolution",
    "addmv",
    "addr",
    "einsum",
    "mv",
    "chain_matmul",
    "linalg_multi_dot",
    "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
)
CUDA_FP32 = (
    "acos",
    "asin",
    "cosh",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "pow.Scalar",
    "softplus",
    "layer_norm",
    "native_layer_norm",
    "rms_norm",
    "group_norm",
    "frobenius_norm.dim",
    "nuclear_norm",
    "nuclear_norm.dim",
    "cosine_similarity",
    "dist",
    "pdist",
    "renorm",
    "logsumexp",
    "upsample_nearest1d",
    "_upsample_nearest_exact1d",
    "upsample_nearest2d",
    "_upsample_nearest_exact2d",
    "upsample_nearest3d",
    "_upsample_nearest_exact3d",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "_upsample_bilinear2d_aa",
    "upsample_trilinear3d",
    "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)
CUDA_FP32_SET_OPT_DTYPE = (
    "softmax.int",
    "log_softmax.int",
    "cumprod",
    "cumsum",
    "linalg_vector_norm",
    "linalg_matrix_norm",
    "linalg_matrix_norm.str_ord",
    "sum",
    "sum.dim_IntList",
)
CUDA_FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
CUDA_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "index_put", "scatter_add", "tensordot")
# CUDA-only ops that do not exist on the CPU path (cuDNN convolutions, CUDA flash attention).
CUDA_IRRELEVANT = ("cudnn_convolution", "cudnn_convolution_transpose", "_scaled_dot_product_flash_attention")


def cuda_only_autocast_ops() -> list[str]:
    """aten ops with an AutocastCUDA kernel but no AutocastCPU kernel in this torch build."""
    out = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::"):
            continue
        try:
            cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCUDA")
            cpu = torch._C._dispatch_has_kernel_for_dispatch_key(name, "AutocastCPU")
        except RuntimeError:
            continue
        if cuda and not cpu:
            out.append(name[len("aten::") :])
    return sorted(out)


def _policy_names() -> set[str]:
    return (
        set(CUDA_LOWER_PRECISION)
        | set(CUDA_FP32)
        | set(CUDA_FP32_SET_OPT_DTYPE)
        | set(CUDA_FP32_APPEND_DTYPE)
        | set(CUDA_PROMOTE)
        | set(CUDA_IRRELEVANT)
    )


def _eligible(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.device.type == "cpu"


def _op(name: str):
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base)
    return getattr(packet, overload or "default")


_NO_AUTOCAST_CPU = None


def _no_autocast_guard():
    global _NO_AUTOCAST_CPU
    if _NO_AUTOCAST_CPU is None:
        _NO_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    return torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST_CPU)


def _cast_to(dtype):
    return lambda t: t.to(dtype) if _eligible(t) and t.dtype != dtype else t


def _make_kernel(name: str, policy: str) -> Callable:
    op = _op(name)

    if policy == "lower":

        def kernel(*args, **kwargs):
            with _no_autocast_guard():
                dt = torch.get_autocast_dtype("cpu")
                args, kwargs = tree_map_only(torch.Tensor, _cast_to(dt), (args, kwargs))
                return op(*args, **kwargs)

    elif policy == "fp32":

        def kernel(*args, **kwargs):
            with _no_autocast_guard():
                args, kwargs = tree_map_only(torch.Tensor, _cast_to(torch.float32), (args, kwargs))
                return op(*args, **kwargs)

    elif policy == "set_opt_dtype":
        pos = [a.name for a in op._schema.arguments if not a.kwarg_only].index("dtype") if any(
            a.name == "dtype" and not a.kwarg_only for a in op._schema.arguments
        ) else None

        def kernel(*args, **kwargs):
            with _no_autocast_guard():
                if _eligible(args[0]):
                    if pos is not None and len(args) > pos:
                        if args[pos] is None:
                            args = args[:pos] + (torch.float32,) + args[pos + 1 :]
                    elif kwargs.get("dtype") is None:
                        kwargs = dict(kwargs, dtype=torch.float32)
                return op(*args, **kwargs)

    elif policy == "append_dtype":
        target = _op(CUDA_FP32_APPEND_DTYPE[name])

        def kernel(*args, **kwargs):
            with _no_autocast_guard():
                if _eligible(args[0]):
                    return target(*args, **kwargs, dtype=torch.float32)
                return op(*args, **kwargs)

    elif policy == "promote":

        def kernel(*args, **kwargs):
            with _no_autocast_guard():
                flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if _eligible(t)]
                if flat:
                    widest = functools.reduce(torch.promote_types, [t.dtype for t in flat])
                    args, kwargs = tree_map_only(torch.Tensor, _cast_to(widest), (args, kwargs))
                return op(*args, **kwargs)

    else:  # pragma: no cover
        raise ValueError(policy)
    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """Register AutocastCPU kernels that apply CUDA's policy to the ops CPU autocast leaves alone
    (pow, rsqrt, exp, log, softmax/log_softmax/sum/cumsum to fp32, layer/group/rms norm to fp32,
    einsum/mv/addmv/addr to lower precision, addcmul/index_put/... promote). Ops both lists share
    keep torch's own kernels (with its weight-cast cache). Difference kept: CUDA caches the
    lower-precision casts of fp32 leaf weights for *all* lower-precision ops; the kernels added
    here (einsum, mv, ...) cast without the cache (they see no weights in the replayed programs).
    CPU-only autocast entries (cat/stack promote, cross_entropy_loss fp32, fft/linalg fp32) are
    left as they are: their results have the same dtypes as CUDA's under type promotion, and the
    replayed programs upcast logits explicitly before the loss."""
    lib = torch.library.Library("aten", "IMPL")  # noqa: TOR901
    try:
        for name in CUDA_LOWER_PRECISION:
            _register(lib, name, "lower")
        for name in CUDA_FP32:
            _register(lib, name, "fp32")
        for name in CUDA_FP32_SET_OPT_DTYPE:
            _register(lib, name, "set_opt_dtype")
        for name in CUDA_FP32_APPEND_DTYPE:
            _register(lib, name, "append_dtype")
        for name in CUDA_PROMOTE:
            _register(lib, name, "promote")
        yield
    finally:
        lib._destroy()


def _register(lib, name: str, policy: str) -> None:
    try:
        _op(name)
    except (AttributeError, RuntimeError):
        return  # op absent from this torch build
    lib.impl(name, _make_kernel(name, policy), "AutocastCPU")


# -------------------------------------------------------------------------------------------
# 4. bitsandbytes gemm_4bit: allocate what the CUDA kernel dispatch allocates
# -------------------------------------------------------------------------------------------
H200_PROPS = (132, 9, 0)  # multiprocessors, compute capability major, minor


@functools.cache
def _bnb_use_custom_fn(props: tuple[int, int, int]) -> Callable[..., bool]:
    """bitsandbytes' CUDA heuristic `_gemm_4bit_use_custom_cuda`, taken from the installed
    backends/cuda/ops.py source (that module cannot be imported without CUDA), with the device
    properties of the replayed GPU."""
    import bitsandbytes

    path = inspect.getfile(bitsandbytes).rsplit("/", 1)[0] + "/backends/cuda/ops.py"
    with open(path) as f:
        tree = ast.parse(f.read())
    wanted = {"_gemm_4bit_use_custom_cuda", "_GEMM_4BIT_CUSTOM_FLOOR_M", "_gemm_4bit_custom_max_m"}
    body = []
    consts: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "_gemm_4bit_use_custom_cuda":
            node.decorator_list = []
            body.append(node)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) in wanted for t in node.targets):
            body.append(node)
        elif isinstance(node, ast.If):  # `_gemm_4bit_custom_max_m` is set under `if torch.version.hip is None`
            for sub in node.body:
                if isinstance(sub, ast.Assign) and any(getattr(t, "id", None) in wanted for t in sub.targets):
                    body.append(sub)
    ns: dict[str, Any] = {"torch": torch, "_gpu_dispatch_props": lambda _idx: props}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), ns)  # noqa: S102
    fn = ns["_gemm_4bit_use_custom_cuda"]
    consts["max_m"] = ns.get("_gemm_4bit_custom_max_m", 1536)

    def use_custom(dtype, M, N, K, blocksize) -> bool:
        if M > consts["max_m"] or K % blocksize != 0:
            return False
        return bool(fn(0, dtype, M, N, K))

    return use_custom


def cuda_gemm_4bit(props=H200_PROPS) -> Callable:
    """Memory-faithful stand-in for `torch.ops.bitsandbytes.gemm_4bit.default` on CUDA: either the
    fused kernel (allocates only the output) or the dequant + F.linear fallback (allocates the
    reconstructed absmax, then a [N, K] weight in A's dtype, then the output)."""
    use_custom = _bnb_use_custom_fn(props)

    def gemm_4bit(
        A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None, absmax_offset=None
    ):
        K = A.shape[-1]
        M = A.numel() // K
        N = shapeB[0]
        if use_custom(A.dtype, M, N, K, blocksize):
            A = A.contiguous()
            if absmax_offset is not None:
                absmax_offset.to(dtype=torch.float32)
            out = torch.empty((*A.shape[:-1], N), dtype=A.dtype, device=A.device)
            return out
        if absmax_8bit is not None:
            absmax_dq = torch.empty_like(absmax_8bit, dtype=torch.float32)
            _ = absmax_dq + absmax_offset  # the dispatch's dequantized absmax, bound until it returns
        B_dq = torch.empty(tuple(shapeB), dtype=A.dtype, device=A.device)
        return torch.nn.functional.linear(A, B_dq, bias)

    return gemm_4bit


@contextlib.contextmanager
def bnb_cuda_gemm(props=H200_PROPS, tracker=None) -> Iterator[None]:
    ns = torch.ops.bitsandbytes
    orig = ns.gemm_4bit
    fn = cuda_gemm_4bit(props)

    def wrapped(*args, **kwargs):
        if tracker is None:
            return fn(*args, **kwargs)
        prev = tracker.alloc_detail
        tracker.alloc_detail = "dequantized_weights"
        try:
            out = fn(*args, **kwargs)
        finally:
            tracker.alloc_detail = prev
        # only the reconstructed absmax and [N, K] weight are attributed: the output is an activation
        tracker.set_detail([out], None)
        return out

    class _Packet:
        default = staticmethod(wrapped)

        def __call__(self, *a, **k):
            return wrapped(*a, **k)

    setattr(ns, "gemm_4bit", _Packet())
    try:
        yield
    finally:
        setattr(ns, "gemm_4bit", orig)


# -------------------------------------------------------------------------------------------
# 5. KV cache attribution
# -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def kv_cache_attribution(tracker) -> Iterator[None]:
    """Storages created inside DynamicLayer.update (the torch.cat that grows keys/values) are
    attributed to the KV cache from their creation on."""
    from transformers import cache_utils

    cls = cache_utils.DynamicLayer
    orig = cls.update

    @functools.wraps(orig)
    def update(self, *args, **kwargs):
        prev = tracker.alloc_detail
        tracker.alloc_detail = "kv_cache"
        try:
            return orig(self, *args, **kwargs)
        finally:
            tracker.alloc_detail = prev

    cls.update = update
    try:
        yield
    finally:
        cls.update = orig


# -------------------------------------------------------------------------------------------
# 6. TRL's fused LM head: allocate what its Triton kernels allocate
# -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def trl_triton_kernels() -> Iterator[None]:
    """TRL 1.16's Triton kernels, as a CUDA run allocates around them.

    ChunkedLogProbFunction (trl/kernels/chunked_logprob.py) folds every logits tile
    with a Triton kernel on CUDA: the forward kernel writes only per-token statistics, the backward
    kernel overwrites the tile with its gradient, and `_addmm_fp32` accumulates the gradient GEMMs
    with `torch.addmm(..., out_dtype=torch.float32, out=acc)`. Without Triton, TRL folds with torch
    ops whose tile-sized fp32 temporaries (and `a.float()` copies) a GPU run never allocates. Here
    the folds allocate what the kernels do: nothing. On fake tensors they are skipped (their values
    are never read back); on real tensors TRL's own torch folds run with the tracker's dispatch
    modes disabled, as a kernel's registers are invisible to the allocator. `selective_log_softmax`
    runs its Triton path (see _LogProbEntropyKernel)."""
    import trl.kernels.chunked_logprob as ck
    from torch.utils._python_dispatch import _disable_current_modes

    orig = {name: getattr(ck, name) for name in ("_forward_tile", "_backward_tile", "_addmm_fp32")}

    def kernel(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(tile, *args, **kwargs):
            if _is_fake(tile):
                return None
            with _disable_current_modes():
                return fn(tile, *args, **kwargs)
        return run

    def addmm_fp32(acc, a, b) -> None:
        if a.dtype not in (torch.float16, torch.bfloat16):
            return orig["_addmm_fp32"](acc, a, b)  # fp32 inputs: `.float()` returns them, no copy
        if _is_fake(acc):
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # CUDA's path (meta kernel)
            return None
        with _disable_current_modes():
            return orig["_addmm_fp32"](acc, a, b)

    ck._forward_tile = kernel(orig["_forward_tile"])
    ck._backward_tile = kernel(orig["_backward_tile"])
    ck._addmm_fp32 = addmm_fp32
    # selective_log_softmax dispatches to the Triton logprob/entropy kernel on CUDA
    import trl.trainer.utils as tu

    saved = {name: tu.__dict__.get(name, _MISSING) for name in
             ("is_triton_available", "_supports_trl_loss_kernel", "_fused_logprob_entropy")}
    tu.is_triton_available = lambda: True
    tu._supports_trl_loss_kernel = lambda logits, index=None, row_mask=None: (
        logits.dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= logits.ndim <= 3
        and logits.stride(-1) == 1 and (index is None or index.shape == logits.shape[:-1]))
    tu._fused_logprob_entropy = lambda logits, index, temperature=1.0, row_mask=None: (
        _LogProbEntropyKernel.apply(logits, index, temperature))
    try:
        yield
    finally:
        for name, fn in orig.items():
            setattr(ck, name, fn)
        for name, fn in saved.items():
            if fn is _MISSING:
                delattr(tu, name)
            else:
                setattr(tu, name, fn)


_MISSING = object()
# libraries whose CUDA kernels the step context can emulate (StepContext.device_kernels)
DEVICE_KERNELS: dict[str, Callable] = {"trl": trl_triton_kernels}


class _LogProbEntropyKernel(torch.autograd.Function):
    """What TRL 1.16.0's Triton `_LogProbEntropyFunction` (trl/kernels/logprob_entropy.py, which
    imports triton and cannot load here) allocates: four fp32 per-token vectors in the forward
    (log-probs, entropy, log Z, expected logit), the logits kept for backward, and one gradient
    like the logits in the backward. The values are computed (on real tensors) by torch with the
    tracker's modes disabled, as the kernel computes them in registers."""

    @staticmethod
    def forward(ctx, logits, index, temperature):
        from torch.utils._python_dispatch import _disable_current_modes

        out = [torch.empty(logits.shape[:-1], device=logits.device, dtype=torch.float32) for _ in range(4)]
        logprobs, entropy, log_z, expected = out
        if not _is_fake(logits):
            with _disable_current_modes():
                z = logits.float() / temperature
                log_z.copy_(z.logsumexp(-1))
                logprobs.copy_(z.gather(-1, index.unsqueeze(-1)).squeeze(-1) - log_z)
                expected.copy_((torch.softmax(z, -1) * z).sum(-1))
                entropy.copy_(log_z - expected)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, index, log_z, expected)
        ctx.temperature = temperature
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        from torch.utils._python_dispatch import _disable_current_modes

        logits, index, log_z, expected = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if not _is_fake(logits):
            with _disable_current_modes():
                z = logits.float() / ctx.temperature
                p = torch.exp(z - log_z.unsqueeze(-1))
                g = torch.zeros_like(z)
                if grad_logprobs is not None:
                    onehot = torch.zeros_like(z).scatter_(-1, index.unsqueeze(-1), 1.0)
                    g += grad_logprobs.unsqueeze(-1) * (onehot - p)
                if grad_entropy is not None:
                    g += grad_entropy.unsqueeze(-1) * p * (expected.unsqueeze(-1) - z)
                grad.copy_(g / ctx.temperature)
        return grad, None, None
