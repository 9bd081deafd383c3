"""Commonsense-reasoning reproduction of DoRA: tasks, prompts, data, models and evaluation."""
