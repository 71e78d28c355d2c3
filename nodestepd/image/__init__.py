"""Container images: a user's image reference becomes a cached, unpacked bundle (docs/security.md)."""
