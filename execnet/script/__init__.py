"""Command-line helpers (socket servers and friends) live here."""
