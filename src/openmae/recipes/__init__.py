"""Recipes: wiring a run config to model, data, optimizer and the training loop."""
