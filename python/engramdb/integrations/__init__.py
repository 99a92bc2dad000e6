"""Optional adapters to agent frameworks; each imports its framework lazily.

* :mod:`engramdb.integrations.langchain`: ``EngramVectorStore``, a LangChain ``VectorStore``
  (``pip install "engramdb[langchain]"``).
* :mod:`engramdb.integrations.mem0`: ``EngramMem0Store``, a Mem0 vector-store backend
  (``pip install "engramdb[mem0]"``).
"""
