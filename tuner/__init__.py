"""Distributed hyperparameter search for fine-tuning-based backdoor defenses."""
