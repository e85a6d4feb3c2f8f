"""Hand-offs from a vitok store to the systems that consume visual tokens (each imports its library lazily)."""
