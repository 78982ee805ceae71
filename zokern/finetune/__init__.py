"""Fine-tuning language models with zokern's optimizers: tasks, model loading, the training loop."""
