"""The evidence benchmark (issue 15): held-out reward-model quality with paired statistics,
controls and a pre-registered decision rule. ``python -m bench.evidence``; see ``cli``."""
