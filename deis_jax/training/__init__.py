"""Training score networks: the denoising score-matching loss and the optax/orbax loop."""
