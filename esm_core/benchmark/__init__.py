"""The few-shot benchmark: tasks, example selection, metrics, the harness and its reports."""
