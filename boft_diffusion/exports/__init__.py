"""Exporting adapters for tools that do not read our folders: the tensor layouts, and the writers."""
