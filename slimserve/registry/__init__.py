"""Model versions: the store's layout, the registry of versions and aliases, and the lock a deploy reads."""
