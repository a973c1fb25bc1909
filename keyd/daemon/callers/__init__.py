"""Who is calling: the caller value, peer credentials, units, names."""
