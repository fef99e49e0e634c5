"""Set-based merging of canonical records into the store (DESIGN rules 2-5)."""
