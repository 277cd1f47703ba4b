"""Training: the one loop (loop.py) every stage uses, one V3 step (step.py), losses, optim,
distributed (DDP/FSDP2), resume, metrics, flops. Imports the model, never the engine or stages."""
