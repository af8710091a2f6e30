"""How each method is trained: its optimiser settings, data and schedule, on the shared trainer
(`zsadkit.training`). A method file (`zsadkit.methods.<name>`) holds the model; its recipe here holds the rest.
"""
