"""Losses as pure functions returning (loss, metrics): contrastive (in-batch, hard-negative, GTE;
`contrastive`), piccolo v2's task losses (CoSENT, classification contrast, distillation; `task`),
Matryoshka (`matryoshka`), the per-task dispatch of a hybrid run (`hybrid`) and the argument checks they
share (`checks`).

May import: `piccolo_jax.config`. No model, data or mesh objects inside.
"""
