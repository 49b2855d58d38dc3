"""The one training loop, the training recipes (standard and adversarial) and the optimiser's groups."""
