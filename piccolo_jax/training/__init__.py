"""Training: the loop (`loop`), the train state and jitted step (`state`, `step`), gradient caching
(`grad_cache`), the optimiser (`optim`), checkpoints (`checkpoint`), memory planning (`memory`), checks
before the first step (`preflight`), exports (`export`), and
what a run reports (`metrics_log`, `progress`, `flops`).

May import: every subpackage except `commands`.
"""
