"""Mutation fuzzing of visualad's readers and image path (see campaign.py)."""
