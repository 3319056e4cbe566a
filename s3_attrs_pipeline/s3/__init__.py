"""Access to the InstantDB file bucket: object metadata by HEAD, with retries and clear failures."""
