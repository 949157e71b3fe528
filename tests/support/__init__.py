"""Fixtures, stand-ins and helpers shared by the test tiers (not tests themselves)."""
