"""The other world: keys, their health, the refresher, Vault and its nodes."""
