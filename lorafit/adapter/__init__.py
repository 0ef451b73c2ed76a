"""The PEFT adapter format both ways: saving, loading and checking adapters, and merging them into a base."""
