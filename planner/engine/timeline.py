"""A step as a list of moments, each with the live bytes per category; the peak is their maximum."""

from __future__ import annotations

from dataclasses import dataclass, field

from planner.engine.tape import Sym, ZERO


@dataclass(frozen=True)
class Moment:
    phase: str
    what: str  # the operation at this moment, for the report
    parts: dict[str, Sym]  # category -> bytes
    details: dict[str, Sym] = field(default_factory=dict)

    @property
    def total(self) -> Sym:
        t = ZERO
        for s in self.parts.values():
            t = t + s
        return t


@dataclass
class Timeline:
    moments: list[Moment] = field(default_factory=list)

    def add(self, phase: str, what: str, details: dict[str, Sym] | None = None, **parts: Sym) -> None:
        self.moments.append(Moment(phase, what, {k: v for k, v in parts.items() if v != ZERO}, details or {}))

    def compiled(self, after_forward: Sym = ZERO, held: Sym = ZERO) -> "CompiledTimeline":
        """Keep per phase only the moments that can be the phase's peak for some batch and length."""
        kept: list[Moment] = []
        for m in self.moments:
            tot = m.total
            same = [k for k in kept if k.phase == m.phase]
            if any(k.total.dominates(tot) for k in same):
                continue
            kept = [k for k in kept if k.phase != m.phase or not tot.dominates(k.total)] + [m]
        return CompiledTimeline(kept, [m.total for m in kept], after_forward, held)


@dataclass(frozen=True)
class CompiledTimeline:
    moments: list[Moment]
    totals: list[Sym]
    # a training step's bytes alive between its forward and its backward beyond the resident ones
    # (the saved activations and bound outputs), for a phase that runs in between
    after_forward: Sym = ZERO
    # what a training step's program keeps bound after its backward (its outputs): a later
    # micro-batch's earlier phases run with them (planner.workload.Phase.previous)
    held: Sym = ZERO

    def evaluate(self, tokens: float, seq: float) -> tuple[Moment, int, dict[str, int]]:
        """The peak moment, its bytes, and the peak of every phase."""
        best_i, best = 0, -1.0
        phases: dict[str, int] = {}
        for i, s in enumerate(self.totals):
            v = s.at(tokens, seq)
            ph = self.moments[i].phase
            if v > phases.get(ph, -1):
                phases[ph] = int(v)
            if v > best:
                best_i, best = i, v
        return self.moments[best_i], int(best), phases
