"""What a person may ask of adaptloop about their data: a copy of it (export), and more to come (forget).

Sits above `streams` and `trainer` (it reads what both keep) and below `api`
and the CLI, which offer it.
"""
