"""Collectives of one training step: bytes each rank sends, and their time on a GPU topology.

Volumes (per rank, for a tensor of S bytes over n ranks, ring algorithms, NCCL's "bus bandwidth"):
    all-reduce       2(n−1)/n · S      (reduce-scatter then all-gather)
    reduce-scatter   (n−1)/n · S       (S = the full, unsharded tensor)
    all-gather       (n−1)/n · S
    send/recv        S
Time = latency + volume / bus bandwidth. Latency uses a tree: ceil(log2 n) hops for reduce-scatter
and all-gather, twice that for all-reduce, one hop for send/recv (NCCL picks trees for small messages;
for large ones the bandwidth term dominates).

Bandwidth. The GPU catalog quotes the interconnect as the datasheet does, the SUM OF BOTH DIRECTIONS
(NVLink 4: 900 GB/s = 450 each way; PCIe 4.0 x16: 64 = 32 each way). A ring sends one way on each
link, so the intra-node bus bandwidth is HALF the catalog figure. Between nodes each GPU has its own
NIC (`inter_node_gbps` gigabits/s each way, default 400 = one 400 Gb/s NIC per GPU; /8 for bytes). A
group spanning nodes with k members per node crosses each node boundary with k NICs in parallel
(NCCL runs one ring per NIC), so its bus bandwidth is min(intra, k · NIC). Achievable fractions of
these links are `LINK_EFFICIENCY` (typical nccl-tests bus bandwidths: about 80% of NVLink, 90% of
InfiniBand/RoCE line rate; assumptions, not measured here).

Rank placement is Megatron's (tp fastest, then dp, then pp; see layout.py): a TP group spans
ceil(tp / gpus_per_node) nodes, a DP group strides by tp, neighbouring pipeline stages are tp·dp ranks
apart.

What overlaps compute (the `overlapped` flag; estimate.py turns it into exposed time):
- DP gradient all-reduce / ZeRO reduce-scatter: bucketed during backward; only the last bucket
  (and whatever does not fit in the backward compute) is exposed.
- ZeRO-3 / FSDP parameter all-gathers: prefetched one unit ahead of forward and backward compute.
- ZeRO-1/2 all-gather of updated parameters after the optimizer step: exposed.
- TP all-reduces (or SP's all-gather/reduce-scatter pairs): on the critical path, exposed.
- PP send/recv between stages: exposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from planner.gpus import GPUSpec
from planner.engine.distributed.layout import Layout

Kind = Literal["all-reduce", "reduce-scatter", "all-gather", "send/recv", "host-copy"]
Window = Literal["forward", "backward", "none"]

LINK_EFFICIENCY = {"intra": 0.80, "inter": 0.90, "host": 0.80}
DEFAULT_HOST_GB_PER_S = {"8.0": 32.0, "9.0": 64.0}  # PCIe 4.0 / 5.0 x16, each direction, by compute capability
FALLBACK_HOST_GB_PER_S = 32.0
DDP_BUCKET_BYTES = 25 * 1024 * 1024  # torch DDP bucket_cap_mb default; the last bucket's reduce is exposed


def bus_factor(kind: Kind, n: int) -> float:
    """Bytes each rank sends per byte of the (full) tensor: ring all-reduce 2(n−1)/n, RS/AG (n−1)/n."""
    if n <= 1 and kind != "send/recv" and kind != "host-copy":
        return 0.0
    if kind == "all-reduce":
        return 2 * (n - 1) / n
    if kind in ("reduce-scatter", "all-gather"):
        return (n - 1) / n
    return 1.0


def latency_hops(kind: Kind, n: int) -> int:
    if kind in ("send/recv", "host-copy"):
        return 1
    if n <= 1:
        return 0
    hops = math.ceil(math.log2(n))
    return 2 * hops if kind == "all-reduce" else hops


@dataclass(frozen=True)
class Topology:
    """Links seen by one rank, bandwidths per direction in bytes/s (before efficiency)."""

    gpus_per_node: int
    intra_bytes_per_s: float
    inter_bytes_per_s: float  # one NIC per GPU
    host_bytes_per_s: float  # GPU <-> CPU (offload)
    intra_latency_s: float
    inter_latency_s: float


def topology(layout: Layout, gpu: GPUSpec) -> Topology:
    both = gpu.interconnect_gb_per_s_both_directions or 64.0  # unknown card: a PCIe 4.0 x16 slot
    per_direction = both / 2  # datasheets quote both directions; a ring uses one
    if gpu.interconnect and gpu.interconnect.startswith("PCIe"):
        host = per_direction
    else:
        host = DEFAULT_HOST_GB_PER_S.get(gpu.compute_capability or "", FALLBACK_HOST_GB_PER_S)
    return Topology(
        gpus_per_node=layout.per_node,
        intra_bytes_per_s=per_direction * 1e9,
        inter_bytes_per_s=layout.inter_node_gbps / 8 * 1e9,
        host_bytes_per_s=host * 1e9,
        intra_latency_s=layout.intra_node_latency_us * 1e-6,
        inter_latency_s=layout.inter_node_latency_us * 1e-6,
    )


@dataclass(frozen=True)
class Group:
    """A process group: its size, how many of its members share a node, and its name."""

    name: str
    size: int
    per_node: int  # members on one node (== size when the group is inside a node)

    @property
    def spans_nodes(self) -> bool:
        return self.per_node < self.size


def groups(layout: Layout) -> dict[str, Group]:
    """TP, DP and PP-neighbour groups under Megatron's rank order."""
    n = layout.per_node
    tp, dp = layout.tp, layout.dp
    tp_g = Group("tp", tp, min(tp, n))
    dp_span = tp * dp  # ranks from the first to the last member, stride tp
    dp_g = Group("dp", dp, dp if dp_span <= n else max(1, n // tp))
    pp_inside = tp * dp * layout.pp <= n
    pp_g = Group("pp", 2, 2 if pp_inside else 1)  # a pair of neighbouring stages
    return {"tp": tp_g, "dp": dp_g, "pp": pp_g}


def bus_bandwidth(group: Group, topo: Topology) -> float:
    """Achievable bytes/s of a ring over `group` (see module doc)."""
    intra = topo.intra_bytes_per_s * LINK_EFFICIENCY["intra"]
    if not group.spans_nodes:
        return intra
    return min(intra, group.per_node * topo.inter_bytes_per_s * LINK_EFFICIENCY["inter"])


@dataclass(frozen=True)
class Collective:
    """One collective (or transfer) of a step, repeated `count` times."""

    name: str
    kind: Kind
    group: str
    group_size: int
    tensor_bytes: float  # S: the full tensor of one call
    count: int  # calls per optimizer step
    bytes_per_rank: float  # sent by each rank over the step: count · factor · S
    time_s: float  # over the step, all calls
    window: Window  # the compute it hides behind ("none": on the critical path, exposed)
    link: str  # "intra", "inter" or "host"

    @property
    def overlapped(self) -> bool:
        return self.window != "none"


def collective(name: str, kind: Kind, group: Group, tensor_bytes: float, count: int, topo: Topology,
               window: Window = "none") -> Collective:
    """Volume and time of `count` calls of `kind` on `tensor_bytes` over `group`."""
    if kind == "host-copy":
        bw = topo.host_bytes_per_s * LINK_EFFICIENCY["host"]
        lat, link = 0.0, "host"
    else:
        bw = bus_bandwidth(group, topo)
        lat = topo.inter_latency_s if group.spans_nodes else topo.intra_latency_s
        link = "inter" if group.spans_nodes else "intra"
    vol = bus_factor(kind, group.size) * tensor_bytes
    per_call = (latency_hops(kind, group.size) * lat + vol / bw) if vol > 0 else 0.0
    return Collective(name, kind, group.name, group.size, tensor_bytes, count, vol * count, per_call * count,
                      window, link)


# ---- published volumes (elements), for tests and reports -----------------------------------------
def dp_allreduce_elements(psi: float, n: int) -> float:
    """Plain DP: one all-reduce of the gradients, 2Ψ(n−1)/n ≈ 2Ψ per rank (ZeRO paper §7)."""
    return bus_factor("all-reduce", n) * psi


def zero_elements(psi: float, n: int, stage: int) -> float:
    """ZeRO-1/2: reduce-scatter of gradients + all-gather of parameters = 2Ψ(n−1)/n;
    ZeRO-3: all-gather in forward and in backward + reduce-scatter = 3Ψ(n−1)/n."""
    f = bus_factor("reduce-scatter", n)
    return (3 if stage >= 3 else 2) * f * psi


def tp_layer_elements(b: int, s: int, h: int, t: int) -> float:
    """Megatron TP per layer per micro-batch: 2 all-reduces of b·s·h in forward and 2 in backward:
    4 · 2(t−1)/t · bsh = 8bsh(t−1)/t elements per rank (Narayanan et al. 2021 §3.3)."""
    return 4 * bus_factor("all-reduce", t) * b * s * h


def pp_elements(b: int, s: int, h: int) -> float:
    """Activations sent from one stage to the next per micro-batch: b·s·h (and as much back)."""
    return float(b * s * h)
