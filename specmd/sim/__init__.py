"""Simulation support: hardware profiles for the emulated clock."""
