"""What a conversion did, as a table for people and JSON for tools."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field


@dataclass
class ConversionReport:
    """Every layer the pass converted, skipped, stripped or reached only by fallback.

    ``converted`` rows: name, kind (``module``, ``functional``, ``attention`` or ``run-time``),
    source and target. ``skipped``: name, type and reason. ``stripped``: name, type and what
    became of it. ``fallbacks``: module name, why it could not be traced (or why its graph was
    not trusted), where, and what the fallback could not do there. ``checks``: the inputs the
    graphs were checked on, how many were checked, and what the run-time check of the converted
    model found (the rows above already say how each layer really ran there).
    """

    settings: dict = field(default_factory=dict)
    converted: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    stripped: list[dict] = field(default_factory=list)
    fallbacks: list[dict] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    calibration: dict | None = None
    reconstruction: dict | None = None  # cosconvert.reconstruct: per block, loss before and after, steps, time

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for row in self.converted:
            kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
        parts = [f"{n} {k}" for k, n in sorted(kinds.items())]
        return (
            f"converted {len(self.converted)} layers ({', '.join(parts) or 'none'}), skipped {len(self.skipped)}, "
            f"stripped {len(self.stripped)} normalizers, {len(self.fallbacks)} fallbacks"
        )

    def __str__(self) -> str:
        lines = [self.summary(), ""]
        sections = [
            ("converted", self.converted, ("name", "kind", "source", "target")),
            ("skipped", self.skipped, ("name", "type", "reason")),
            ("stripped", self.stripped, ("name", "type", "action")),
            ("fallbacks", self.fallbacks, ("name", "reason", "location", "limits")),
        ]
        for title, rows, columns in sections:
            if rows:
                lines += [f"{title}:", *_table(rows, columns), ""]
        if self.parameters:
            p = self.parameters
            lines.append(f"parameters: {p['original']:,} -> {p['converted']:,}")
        if self.checks:
            lines.append("checks: " + "; ".join(f"{k}: {v}" for k, v in self.checks.items()))
        if self.calibration:
            c = self.calibration
            lines.append(f"calibration: {c['status']}, {c['fitted']} of {c['layers']} layers fitted, "
                         f"agreement {c['before']} -> {c['after']}")  # fmt: skip
        if self.reconstruction:
            blocks = self.reconstruction["blocks"]
            lines.append("reconstruction: " + ", ".join(
                f"{b['block']} {b['loss_before']:.3g} -> {b['loss_after']:.3g} ({b['steps']} steps, {b['seconds']:.1f} s)"
                for b in blocks))  # fmt: skip
        return "\n".join(lines).rstrip()


def _table(rows: list[dict], columns: tuple[str, ...]) -> list[str]:
    """Columns at most 60 wide; longer cells wrap onto the next lines, never cut."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [min(60, max(len(c), *(len(r[i]) for r in cells))) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    lines = ["  " + fmt.format(*columns).rstrip(), "  " + fmt.format(*("-" * w for w in widths))]
    for row in cells:
        wrapped = [textwrap.wrap(text, w) or [""] for text, w in zip(row, widths)]
        for k in range(max(map(len, wrapped))):
            lines.append(("  " + fmt.format(*(c[k] if k < len(c) else "" for c in wrapped))).rstrip())
    return lines
