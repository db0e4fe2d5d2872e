"""Audit-report registry: signed report submission, leaderboard and a Merkle transparency log."""
