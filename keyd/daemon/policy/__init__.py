"""What a caller may do: grants and rate limits."""
