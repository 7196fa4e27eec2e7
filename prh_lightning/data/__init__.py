"""Datasets used by the recipes, found locally first (Debian package, shared folders)."""
