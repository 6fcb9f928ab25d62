"""Example training tasks built on AdaPM."""
