"""What is computed: the request schema, the item tower and the unified task-token ranker."""
