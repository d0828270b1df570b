"""CUDA sources of lgm-op, installed as package data (read as text, never imported as code)."""
