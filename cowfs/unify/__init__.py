"""Unification: sharing identical files between guests as COW-marked hard links.

- clone: a new guest as COW links to a template (`cowfs clone`).
- hashify: deduplicating existing guests into the content store (`cowfs hashify`),
  a package of phases (scan, grouping, hashing, linking; its docstring maps
  them); excludes: which paths it may touch.
- store: the content store, one inode per unique content and metadata (`cowfs store`).
"""
