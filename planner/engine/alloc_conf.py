"""`PYTORCH_CUDA_ALLOC_CONF` / `PYTORCH_ALLOC_CONF` settings, parsed as torch 2.11-2.13 parses them.

Source: c10/core/AllocatorConfig.cpp (`AcceleratorAllocatorConfig::parseArgs`) and
c10/cuda/CUDAAllocatorConfig.cpp. The tokenizer splits on `,` `:` `[` `]` and drops spaces; keys:

- `max_split_size_mb` (integer >= 20): blocks at least this large are never split, and a request
  below it never takes one;
- `max_non_split_rounding_mb` (integer >= 20, default 20): how much larger than a request at or
  above `max_split_size_mb` a cached block may be and still serve it;
- `garbage_collection_threshold` (0 < v < 1): reclaim old cached blocks once reserved passes this
  fraction of the per-process memory limit (only active with `set_per_process_memory_fraction`);
- `roundup_power2_divisions`: a power of two (every size interval), or a list
  `[256:1,512:2,>:4]` of per-interval divisions (interval bounds in MB, powers of two; values 0 or
  a power of two);
- `expandable_segments` (True/False); `backend` (native/cudaMallocAsync);
- `release_lock_on_cudamalloc`, `pinned_use_cuda_host_register`, `pinned_use_background_threads`
  (True/False) and `pinned_num_register_threads` (a power of two): accepted, no effect on device
  memory.

Errors are one line naming the key and what it allows (PlanError, exit code 2 in the CLI).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from planner.errors import PlanError, did_you_mean

MB = 1 << 20
KLARGE_BUFFER = 20 * MB  # kLargeBuffer: the minimum of the two *_mb options
ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MB .. 64 GB, one entry per power of two

KEYS = (
    "max_split_size_mb",
    "max_non_split_rounding_mb",
    "garbage_collection_threshold",
    "roundup_power2_divisions",
    "expandable_segments",
    "backend",
    "release_lock_on_cudamalloc",
    "pinned_use_cuda_host_register",
    "pinned_num_register_threads",
    "pinned_use_background_threads",
)
_BOOL_KEYS = (
    "expandable_segments",
    "release_lock_on_cudamalloc",
    "pinned_use_cuda_host_register",
    "pinned_use_background_threads",
)


class AllocatorConfig(BaseModel):
    """The caching allocator's settings (defaults: `PYTORCH_CUDA_ALLOC_CONF` unset)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_split_size_bytes: int | None = Field(None, description="None: unlimited (SIZE_MAX)")
    max_non_split_rounding_bytes: int = KLARGE_BUFFER
    garbage_collection_threshold: float = 0.0
    roundup_power2_divisions: tuple[int, ...] = (0,) * ROUNDUP_INTERVALS
    expandable_segments: bool = False
    backend: Literal["native", "cudaMallocAsync"] = "native"
    release_lock_on_cudamalloc: bool = False
    pinned_use_cuda_host_register: bool = False
    pinned_num_register_threads: int = 1
    pinned_use_background_threads: bool = False

    def to_conf(self) -> str:
        """The settings that differ from the defaults, in PYTORCH_CUDA_ALLOC_CONF syntax."""
        out = []
        if self.backend != "native":
            out.append(f"backend:{self.backend}")
        if self.expandable_segments:
            out.append("expandable_segments:True")
        if self.max_split_size_bytes is not None:
            out.append(f"max_split_size_mb:{self.max_split_size_bytes // MB}")
        if self.max_non_split_rounding_bytes != KLARGE_BUFFER:
            out.append(f"max_non_split_rounding_mb:{self.max_non_split_rounding_bytes // MB}")
        if self.garbage_collection_threshold:
            out.append(f"garbage_collection_threshold:{self.garbage_collection_threshold:g}")
        div = self.roundup_power2_divisions
        if any(div):
            if len(set(div)) == 1:
                out.append(f"roundup_power2_divisions:{div[0]}")
            else:
                parts = [f"{1 << i}:{v}" for i, v in enumerate(div[:-1])] + [f">:{div[-1]}"]
                out.append(f"roundup_power2_divisions:[{','.join(parts)}]")
        return ",".join(out)


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _tokens(text: str) -> list[str]:
    """ConfigTokenizer: `,` `:` `[` `]` are tokens of their own, spaces are dropped."""
    return [t for t in re.split(r"([,:\[\]])|\s+", text) if t]


def _int(key: str, tok: str) -> int:
    if not re.fullmatch(r"\d+", tok):
        raise PlanError(f"alloc-conf {key}: expected a non-negative integer (got {tok!r})")
    return int(tok)


def _bool(key: str, tok: str) -> bool:
    if tok not in ("True", "False", "true", "false"):
        raise PlanError(f"alloc-conf {key}: expected True or False (got {tok!r})")
    return tok in ("True", "true")


def parse_alloc_conf(text: str | None) -> AllocatorConfig:
    """Parse a PYTORCH_CUDA_ALLOC_CONF string ("" or None: the defaults)."""
    if text is None or not text.strip():
        return AllocatorConfig()
    return _Parser(text).parse()


class _Parser:
    """parseArgs: `key:value` items separated by commas; the position moves token by token."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def take(self, what: str) -> str:
        self.i += 1
        if self.i >= len(self.toks):
            raise PlanError(f"alloc-conf: expected {what} at the end of {self.text!r}")
        return self.toks[self.i]

    def expect(self, tok: str, key: str) -> None:
        got = self.take(f"'{tok}' after {key}")
        if got != tok:
            raise PlanError(f"alloc-conf {key}: expected '{tok}' (got {got!r})")

    def parse(self) -> AllocatorConfig:
        vals: dict = {}
        toks = self.toks
        while self.i < len(toks):
            key = toks[self.i]
            if key not in KEYS:
                raise PlanError(
                    f"alloc-conf: unknown key {key!r}{did_you_mean(key, KEYS)}; allowed: {', '.join(KEYS)}"
                )
            self.expect(":", key)
            if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
                v = _int(key, self.take(f"a value for {key}"))
                if v < KLARGE_BUFFER // MB:
                    raise PlanError(f"alloc-conf {key}: must be >= {KLARGE_BUFFER // MB} (got {v})")
                name = "max_split_size_bytes" if key == "max_split_size_mb" else "max_non_split_rounding_bytes"
                vals[name] = v * MB
            elif key == "garbage_collection_threshold":
                tok = self.take("a value for garbage_collection_threshold")
                try:
                    v = float(tok)
                except ValueError:
                    raise PlanError(
                        f"alloc-conf garbage_collection_threshold: expected a number (got {tok!r})"
                    ) from None
                if not 0.0 < v < 1.0:
                    raise PlanError(f"alloc-conf garbage_collection_threshold: must be in (0.0, 1.0) (got {tok})")
                vals[key] = v
            elif key == "roundup_power2_divisions":
                vals[key] = self.divisions()
            elif key in _BOOL_KEYS:
                vals[key] = _bool(key, self.take(f"True or False for {key}"))
            elif key == "backend":
                tok = self.take("native or cudaMallocAsync")
                if tok not in ("native", "cudaMallocAsync"):
                    raise PlanError(f"alloc-conf backend: expected native or cudaMallocAsync (got {tok!r})")
                vals[key] = tok
            elif key == "pinned_num_register_threads":
                v = _int(key, self.take("a value for pinned_num_register_threads"))
                if not _is_pow2(v):
                    raise PlanError(f"alloc-conf pinned_num_register_threads: must be a power of 2 (got {v})")
                vals[key] = v
            if self.i + 1 < len(toks):
                self.expect(",", key)
            self.i += 1
        return AllocatorConfig(**vals)

    def divisions(self) -> tuple[int, ...]:
        """roundup_power2_divisions: `4` or `[256:1,512:2,>:4]` (parseRoundUpPower2Divisions)."""
        key = "roundup_power2_divisions"
        tok = self.take(f"a value for {key}")
        if tok != "[":
            v = _int(key, tok)
            if not _is_pow2(v):
                raise PlanError(f"alloc-conf {key}: the divisions must be a power of 2 (got {v})")
            return (v,) * ROUNDUP_INTERVALS
        div = [0] * ROUNDUP_INTERVALS
        toks = self.toks
        first, last_index = True, 0
        i = self.i + 1
        while i < len(toks) and toks[i] != "]":
            bound = toks[i]
            if i + 2 >= len(toks) or toks[i + 1] != ":":
                raise PlanError(f"alloc-conf {key}: expected '<MB>:<divisions>' entries in [...] (in {self.text!r})")
            v = _int(key, toks[i + 2])
            if v != 0 and not _is_pow2(v):
                raise PlanError(f"alloc-conf {key}: divisions must be 0 or a power of 2 (got {v})")
            if bound == ">":
                for j in range(last_index + 1, ROUNDUP_INTERVALS):
                    div[j] = v
            else:
                b = _int(key, bound)
                if not _is_pow2(b):
                    raise PlanError(f"alloc-conf {key}: interval bounds must be powers of 2 in MB (got {b})")
                index = min(b.bit_length() - 1, ROUNDUP_INTERVALS - 1)
                if first:
                    for j in range(index):
                        div[j] = v
                    first = False
                div[index] = v
                last_index = index
            i += 3
            if i < len(toks) and toks[i] not in (",", "]"):
                raise PlanError(f"alloc-conf {key}: expected ',' or ']' (got {toks[i]!r})")
            if i < len(toks) and toks[i] == ",":
                i += 1
        if i >= len(toks):
            raise PlanError(f"alloc-conf {key}: expected a closing ']' (in {self.text!r})")
        self.i = i
        return tuple(div)
