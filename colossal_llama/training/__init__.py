"""Booster-plugin training: config/CLI (config, cli), plugin + booster (plugin), data + sampler (data),
collation and document masks (collate), model options (model), AdamW + schedule (optim), one step (step),
checkpoints (checkpoint), metrics (metrics), process group (distributed), the loop (loop)."""
