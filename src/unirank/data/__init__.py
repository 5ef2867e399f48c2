"""Model-independent data layer: datasets, the leave-one-out split, protocol queries, request building, training examples, item LM features."""
