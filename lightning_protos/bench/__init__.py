"""``protos bench``: seeds x methods x data sets as ordinary ``protos fit`` runs, and their tables.

``spec`` reads a table's YAML (schema in its docstring) into cells, ``runner`` runs them with
skip and resume, ``reference`` holds the scikit-learn references, ``report`` aggregates rows.
"""
