# What type checkers see of `import nodestepd`: __init__.py loads Client lazily (through a
# module __getattr__, unannotated so as not to import typing on every nodestepctl start).
from nodestepd.client import Client as Client

__version__: str
