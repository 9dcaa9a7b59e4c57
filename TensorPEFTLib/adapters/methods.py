"""The built-in methods: importing this module registers each of them (each file calls ``registry.register``).

Kept apart from the registry so that the registry imports no method file and no method file is imported by it: the
arrows point one way (method files → registry), and a new method is one new file plus one line here.
"""

from . import full, lora, lycoris, quanta, selora, ssf, tensor_stack, tenvoo  # noqa: F401  (registration)
from .registry import all_methods, get_method, method_names

__all__ = ["all_methods", "get_method", "method_names"]
