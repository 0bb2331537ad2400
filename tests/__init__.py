"""Tests for llm2loss_pipeline (a package so that test modules can be imported by dotted path)."""
