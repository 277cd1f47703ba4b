"""Reinforcement learning from rule rewards: rewards.py (pure, torch-free)."""
