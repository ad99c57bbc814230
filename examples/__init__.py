"""Example applications for minipub; run each from the repository root."""
