"""Merge methods: each module (or folder) here is one method, registered by name; base.py says
what a method is to the engine, registry.py how they are found."""

from mergeflow.workers.methods.base import ChunkContext, Method, MethodOutput, NoParams, Redo
from mergeflow.workers.methods.registry import get_method, methods, register

__all__ = ["ChunkContext", "Method", "MethodOutput", "NoParams", "Redo", "get_method", "methods", "register"]
