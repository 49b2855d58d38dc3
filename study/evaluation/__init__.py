"""The attack suite run on a trained model and the integrity checks (flags) that decide whether its numbers can be trusted."""
