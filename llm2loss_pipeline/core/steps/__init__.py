"""One function per asset: the glue between artifacts under LLM2LOSS_HOME and the method.

Each step reads its inputs from the layout, calls the method, writes its outputs atomically and
returns what the orchestrator shows (tables, metrics, a content hash used as the data version).
Steps know nothing about Dagster, so a notebook or another orchestrator can call them too.
"""
